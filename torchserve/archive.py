"""Builds a model archive (.mar) and its version hash.

The version is the sha256 of the archive's content: every member of the TorchScript
file, the handler and the metadata (without the version field itself), each named, in
name order. Left out: zip timestamps, TorchServe's MANIFEST (it records the build time)
and TorchScript's ``.data/serialization_id`` (random per save). TorchScript's emitted code
follows set iteration order, so the model is saved in a child with a fixed hash seed.
Together these make the same seed give the same version on every build.
"""

from __future__ import annotations

import argparse
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

from feature_cache.schema import MODEL_INPUT_NAMES, MODEL_INPUT_WIDTH, SCHEMA_VERSION

log = logging.getLogger(__name__)

HANDLER_SOURCE = Path(__file__).with_name("handler.py")


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
            meta = json.loads(archive.read("model-meta.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def torchscript_members(path: Path) -> dict[str, bytes]:
    """The members of a TorchScript file that define the model."""
    with zipfile.ZipFile(path) as archive:
        return {
            f"model.pt/{name.split('/', 1)[1]}": archive.read(name)
            for name in archive.namelist()
            if not name.endswith(".data/serialization_id")
        }


def save_model(path: Path, seed: int) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(  # noqa: S603 - fixed argv, no shell
        [sys.executable, "-m", "torchserve.model", "--out", str(path), "--seed", str(seed)],
        check=True,
        env=env,
    )


def build_archive(export_dir: Path, *, model_name: str = "champion", seed: int = 0) -> ArchiveInfo:
    """Writes ``{export_dir}/{model_name}.mar`` and returns its version."""
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        work = Path(tmp)
        save_model(work / "model.pt", seed)
        shutil.copyfile(HANDLER_SOURCE, work / "handler.py")
        meta = {
            "model_name": model_name,
            "serialized_file": "model.pt",
            "input_width": MODEL_INPUT_WIDTH,
            "input_names": list(MODEL_INPUT_NAMES),
            "feature_schema_version": SCHEMA_VERSION,
            "seed": seed,
        }
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        version = content_version(
            {
                **torchscript_members(work / "model.pt"),
                "handler.py": (work / "handler.py").read_bytes(),
                "model-meta.json": meta_bytes,
            }
        )
        (work / "model-meta.json").write_text(json.dumps({**meta, "version": version}))
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                str(Path(sys.executable).with_name("torch-model-archiver")),
                "--model-name",
                model_name,
                "--version",
                "1.0",
                "--serialized-file",
                str(work / "model.pt"),
                "--handler",
                str(work / "handler.py"),
                "--extra-files",
                str(work / "model-meta.json"),
                "--export-path",
                str(export_dir),
                "--force",
            ],
            check=True,
        )
    info = ArchiveInfo(model_name, export_dir / f"{model_name}.mar", version)
    log.info("built %s version %s", info.path, info.version)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--model-name", default="champion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_archive(args.export_dir, model_name=args.model_name, seed=args.seed)


if __name__ == "__main__":
    main()
