"""PostgreSQL for the tests and the audit bench: a database of a caller's own, on the
server it names, else the machine's own on 5432, else a throwaway server started here
(loopback only, trust auth, its own data folder). As root that server runs as the
``postgres`` user (PostgreSQL refuses to run as root), so its folder and its parents
must be traversable by that user (``/tmp/<something 0755>``, not pytest's temp folders)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from core.processes import ManagedProcess, free_port, listening, start_ready

MACHINE_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


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


def _admin_engine(url: str) -> sa.Engine | None:
    engine = sa.create_engine(
        url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError:
        engine.dispose()
        return None
    return engine


@contextlib.contextmanager
def postgres_admin(configured: str | None = None) -> Iterator[sa.Engine]:
    """An engine on a server where this user may create databases: ``configured`` (a
    RuntimeError when it does not answer), else the machine's own, else a server started
    here and stopped after."""
    with contextlib.ExitStack() as cleanup:
        engine = _admin_engine(configured or MACHINE_POSTGRES_URL)
        if engine is None and configured:
            raise RuntimeError(f"PostgreSQL not reachable at {configured}")
        if engine is None:
            run_dir = Path(tempfile.mkdtemp(prefix="decision-pg-"))
            cleanup.callback(shutil.rmtree, run_dir, ignore_errors=True)
            run_dir.chmod(0o755)
            port = free_port()
            proc = start_postgres(port, run_dir / "pg")
            cleanup.callback(proc.stop)
            engine = _admin_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
            if engine is None:
                raise RuntimeError(
                    f"the PostgreSQL server started does not answer: {proc.log_tail()}"
                )
        cleanup.callback(engine.dispose)
        yield engine


@contextlib.contextmanager
def own_database(admin: sa.Engine, prefix: str) -> Iterator[str]:
    """The URL of a new database on ``admin``'s server, dropped after."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
