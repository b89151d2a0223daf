"""The configuration the docs promise is the code's: the generated reference is current, every
``DECISION_*`` variable the docs name exists, and the README's table has the code's defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from localstack.config_reference import REFERENCE, Setting, render, settings

REPO = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"DECISION_[A-Z0-9_]+?__[A-Z0-9_]+")
BY_NAME = {s.variable: s for s in settings()}


def _documents() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "k8s").rglob("*.yaml")),
    ]


def test_the_reference_is_generated_from_the_current_settings() -> None:
    assert REFERENCE.read_text() == render(), "run make config-doc"


def test_the_reference_lists_a_known_setting_with_its_default_and_processes() -> None:
    redis_url = BY_NAME["DECISION_REDIS__URL"]
    assert redis_url.default == "redis://127.0.0.1:16379/0"
    assert set(redis_url.processes) == {"decision-server", "feature-cache", "labeler"}
    assert BY_NAME["DECISION_SERVER__PORT"].processes == ("decision-server",)
    assert "| `DECISION_SERVER__PORT` | 50051 | decision-server |" in render()


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_variable_a_document_names_is_a_setting(document: Path) -> None:
    named = set(VARIABLE.findall(document.read_text()))
    unknown = sorted(named - BY_NAME.keys())
    assert not unknown, f"{document.name} names settings that do not exist: {unknown}"


def _readme_table() -> list[tuple[list[str], list[str]]]:
    """The README's Configuration table: each row's variables (a ``__FIELD`` shorthand
    expanded with the row's first section) and its default cell split on `` / ``."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `DECISION_"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        names = re.findall(r"`(DECISION_[A-Z0-9_]+|__[A-Z0-9_]+)`", cells[0])
        prefix = names[0].split("__")[0]
        full = [name if name.startswith("DECISION_") else prefix + name for name in names]
        rows.append((full, cells[1].split(" / ")))
    return rows


def _agrees(shown: str, setting: Setting) -> bool:
    """A README default against the code's: ``(...)`` says empty or unset; otherwise the
    first word (``0 (one per core)`` shows 0) is the value."""
    value = setting.default
    if shown.startswith("("):  # empty or unset: a 0 or false is shown as such
        if isinstance(value, SecretStr):
            return not value.get_secret_value()
        return value is None or (isinstance(value, str) and not value)
    word = shown.split(" ")[0]
    if isinstance(value, bool):
        return word == ("true" if value else "false")
    if isinstance(value, int | float):
        try:
            return float(word) == float(value)
        except ValueError:
            return False
    return word == str(value)


def test_the_readme_table_shows_the_code_defaults() -> None:
    rows = _readme_table()
    assert len(rows) > 30, "the README's Configuration table was not found"
    wrong = []
    for names, defaults in rows:
        if len(defaults) == 1:
            defaults = defaults * len(names)
        assert len(defaults) == len(names), f"{names}: {len(defaults)} defaults"
        for name, shown in zip(names, defaults, strict=True):
            setting = BY_NAME.get(name)
            if setting is None:
                wrong.append(f"{name}: no such setting")
            elif not _agrees(shown, setting):
                wrong.append(f"{name}: README says {shown!r}, the code {setting.default!r}")
    assert not wrong, "\n".join(wrong)


def test_the_check_fails_on_a_changed_default() -> None:
    port = BY_NAME["DECISION_SERVER__PORT"]
    assert _agrees("50051", port)
    assert not _agrees("50052", port)
    assert not _agrees("(none)", port)
    assert _agrees("(empty: off)", BY_NAME["DECISION_DRIFT__MODEL_STORE"])
