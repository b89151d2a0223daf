"""Workers lost, as a replica's frontend log says: the soak's bound and the abandoned-calls
test count them. Lines in the form TorchServe 0.12 writes them."""

from __future__ import annotations

from pathlib import Path

from torchserve.replica import workers_lost

LOG_TIME = "2026-11-25T14:40:14,320 [INFO ] epollEventLoopGroup-5-1 org.pytorch.serve.wlm"
CRASHED = f"{LOG_TIME}.WorkerThread - 42201 Worker disconnected. WORKER_STOPPED\n"
RETRIED = f"{LOG_TIME}.WorkerThread - Retry worker: 42201 in 1 seconds.\n"
# A worker lost while its model was loaded, and never started again: no retry follows.
NOT_RETRIED = f"{LOG_TIME}.WorkerThread - 42201 Worker disconnected. WORKER_MODEL_LOADED\n"
SCALED_DOWN = f"{LOG_TIME}.WorkerThread - 42201 Worker disconnected. WORKER_SCALED_DOWN\n"
OTHER = f"{LOG_TIME}.WorkerThread - IllegalStateException error\n"


def write_log(replica_dir: Path, name: str, lines: list[str]) -> None:
    logs = replica_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / name).write_text("".join(lines))


def test_a_lost_worker_counts_whether_or_not_it_was_started_again(tmp_path: Path) -> None:
    write_log(tmp_path, "ts_log.log", [OTHER, CRASHED, RETRIED, OTHER, NOT_RETRIED])
    assert workers_lost(tmp_path) == 2


def test_rolled_logs_count_and_a_worker_scaled_down_does_not(tmp_path: Path) -> None:
    write_log(tmp_path, "ts_log.1.log", [CRASHED, RETRIED])
    write_log(tmp_path, "ts_log.log", [SCALED_DOWN, NOT_RETRIED])
    write_log(tmp_path, "access_log.log", [CRASHED])  # another log: not the frontend's
    assert workers_lost(tmp_path) == 2


def test_a_replica_with_no_log_yet_lost_none(tmp_path: Path) -> None:
    assert workers_lost(tmp_path) == 0
