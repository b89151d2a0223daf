"""A throwaway redis-server: loopback only, nothing persisted."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.processes import ManagedProcess, listening, start_ready


def redis_server(port: int, run_dir: Path, *, name: str = "redis-server") -> ManagedProcess:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found on PATH (apt-get install redis-server)")
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(run_dir),
        "--protected-mode", "yes",
    ]  # fmt: skip
    return ManagedProcess(name, argv, cwd=run_dir, log_path=run_dir / f"{name}.log")


def start_redis(port: int, run_dir: Path, *, timeout_s: float = 10.0) -> ManagedProcess:
    return start_ready(redis_server(port, run_dir), listening(port), timeout_s)
