"""Builds a model archive (.mar) and its version hash.

The version is the sha256 of the archive's content: every member of the serialized
model (each member of a TorchScript file; an XGBoost JSON file as it is), the handler and
the other files (metadata without the version field itself, reference distributions),
each named, in name order. Left out: zip timestamps, TorchServe's MANIFEST (it records
the build time) and TorchScript's ``.data/serialization_id`` (random per save).
TorchScript's emitted code follows set iteration order, so models are saved in a process
with a fixed hash seed (``torchserve.train`` sees to it). Together these make the same
seed give the same version on every build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HANDLER_SOURCE = Path(__file__).with_name("handler.py")
META_FILE = "model-meta.json"


@dataclass(frozen=True)
class ArchiveInfo:
    model_name: str
    path: Path
    version: str  # sha256 hex of the content


def content_version(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def archive_version(path: Path) -> str | None:
    """The version hash written into an archive at build time; None if it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(META_FILE))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def archive_meta(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        meta: dict[str, Any] = json.loads(archive.read(META_FILE))
    return meta


def serialized_members(path: Path) -> dict[str, bytes]:
    """The content of a serialized model that defines it, by member name."""
    if not zipfile.is_zipfile(path):
        return {path.name: path.read_bytes()}
    with zipfile.ZipFile(path) as archive:  # TorchScript: a zip of code, constants, data
        return {
            f"{path.name}/{name.split('/', 1)[1]}": archive.read(name)
            for name in archive.namelist()
            if not name.endswith(".data/serialization_id")
        }


def build_archive(
    export_dir: Path,
    *,
    model_name: str,
    serialized_file: Path,
    meta: dict[str, Any],
    extra_files: dict[str, bytes],
) -> ArchiveInfo:
    """Writes ``{export_dir}/{model_name}.mar`` and returns its version.

    ``meta`` goes into ``model-meta.json`` with ``model_name``, ``serialized_file`` and
    the version added; the handler reads it at load.
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        work = Path(tmp)
        model_file = work / serialized_file.name
        shutil.copyfile(serialized_file, model_file)
        shutil.copyfile(HANDLER_SOURCE, work / "handler.py")
        full_meta = {**meta, "model_name": model_name, "serialized_file": model_file.name}
        meta_bytes = json.dumps(full_meta, sort_keys=True).encode()
        for name, content in extra_files.items():
            (work / name).write_bytes(content)
        version = content_version(
            {
                **serialized_members(model_file),
                "handler.py": (work / "handler.py").read_bytes(),
                META_FILE: meta_bytes,
                **extra_files,
            }
        )
        (work / META_FILE).write_text(json.dumps({**full_meta, "version": version}, indent=1))
        extras = [str(work / META_FILE), *(str(work / name) for name in sorted(extra_files))]
        argv = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name", model_name,
            "--version", "1.0",
            "--serialized-file", str(model_file),
            "--handler", str(work / "handler.py"),
            "--extra-files", ",".join(extras),
            "--export-path", str(export_dir),
            "--force",
        ]  # fmt: skip
        # The archiver stages the files in {temp folder}/{model name}, removed first: two
        # archives of one name built at once (make models beside a test run) would share
        # it, and one failed with "File exists". A temp folder of this call's own.
        staging = work / "staging"
        staging.mkdir()
        env = {**os.environ, "TMPDIR": str(staging)}
        subprocess.run(argv, check=True, env=env)  # noqa: S603 - fixed argv, no shell
    info = ArchiveInfo(model_name, export_dir / f"{model_name}.mar", version)
    log.info("built %s version %s", info.path, info.version)
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m torchserve.archive version PATH``: prints the archive's version hash
    (exit 1 when it has none); the model-server image's build checks it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "version":
        print("usage: python -m torchserve.archive version PATH", file=sys.stderr)  # noqa: T201
        return 2
    version = archive_version(Path(args[1]))
    if version is None:
        print(f"{args[1]}: not a model archive with a version", file=sys.stderr)  # noqa: T201
        return 1
    print(version)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
