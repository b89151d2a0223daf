"""The version is the git tag's (setuptools-scm, [tool.setuptools_scm] in pyproject.toml),
and decision_build_info reports it with the commit (core.build)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.build import REVISION, VERSION

REPO = Path(__file__).resolve().parents[2]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def scm_version(cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "setuptools_scm"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_the_version_is_the_tag_and_says_how_far_past_it_a_later_commit_is(tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", "--no-tags", str(REPO), str(clone))
    git(clone, "tag", "v9.8.7")
    assert scm_version(clone) == "9.8.7"
    git(
        clone,
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "--quiet",
        "--allow-empty",
        "-m",
        "next",
    )
    head = git(clone, "rev-parse", "--short=9", "HEAD")
    later = scm_version(clone)
    assert later.startswith("9.8.8.dev1+g") and head.startswith(later.split("+g")[1][:7])


def test_this_install_reports_a_version_and_its_commit():
    assert VERSION not in ("", "unknown")
    assert len(REVISION) >= 7 and all(c in "0123456789abcdef" for c in REVISION)
