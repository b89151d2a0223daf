"""A throwaway PostgreSQL server for tests on a machine that runs none: loopback only,
trust auth, its own data folder. As root it runs as the ``postgres`` user (PostgreSQL
refuses to run as root), so ``run_dir`` and its parents must be traversable by that user
(``/tmp/<something 0755>``, not pytest's private temp folders)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from core.processes import ManagedProcess, listening, start_ready


def postgres_bin_dir() -> Path | None:
    """The newest installed server's bin folder (Debian keeps it off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _as_postgres_user(run_dir: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam("postgres")
    for path in (run_dir, *run_dir.rglob("*")):
        os.chown(path, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def postgres_server(port: int, run_dir: Path) -> ManagedProcess:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server not found (apt-get install postgresql)")
    data = run_dir / "data"
    run_dir.mkdir(parents=True, exist_ok=True)
    prefix = _as_postgres_user(run_dir)
    if not (data / "PG_VERSION").exists():
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
    argv = [
        *prefix, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
        "-k", str(run_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
    ]  # fmt: skip
    return ManagedProcess("postgres", argv, cwd=run_dir, log_path=run_dir / "postgres.log")


def start_postgres(port: int, run_dir: Path, *, timeout_s: float = 30.0) -> ManagedProcess:
    return start_ready(postgres_server(port, run_dir), listening(port), timeout_s)
