"""Replay time rebasing (pure logic), and the replayer as a process: bad input, an
unreachable broker and a recording with nothing to publish are each one line on stderr
and their own exit status, never a traceback, never "published"."""

from __future__ import annotations

import gzip
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.processes import free_port
from feature_cache.events import Aggressor, Trade
from feature_cache.generator import MarketGenerator
from feature_cache.replay import rebased
from feature_cache.settings import KafkaSettings
from tests.feature_cache.recordings import write_csv

REPO = Path(__file__).resolve().parents[2]
# The exit statuses the replayer documents (its --help, docs/market-data.md).
EXIT_UNREADABLE, EXIT_NO_EVENTS, EXIT_BROKER, EXIT_STOPPED = 3, 4, 5, 130
EVENTS = [Trade("X", t, i, 1.0, 1.0, Aggressor.BUY) for i, t in enumerate((100, 150, 400), 1)]


def test_paced_replay_starts_now_and_full_speed_replay_ends_now():
    assert [e.exchange_time_us for e in rebased(EVENTS, 1000, end_now=False)] == [1000, 1050, 1300]
    assert [e.exchange_time_us for e in rebased(EVENTS, 1000, end_now=True)] == [700, 750, 1000]
    assert list(rebased([], 1000, end_now=True)) == list(rebased([], 1000, end_now=False)) == []


def replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m feature_cache.replay ARGS``; a hang fails the test (TimeoutExpired)."""
    return subprocess.run(
        [sys.executable, "-m", "feature_cache.replay", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line the replayer says on stderr, asserting it said nothing else."""
    assert "Traceback" not in done.stderr, done.stderr
    assert " in session " not in done.stderr, done.stderr  # the line of a replay done
    (line,) = done.stderr.splitlines()
    assert line.startswith("replay: "), line
    return line


def cut_gzip(folder: Path, keep: float) -> Path:
    """A gzip CSV recording cut after ``keep`` of its bytes, as a copy interrupted."""
    events = list(
        MarketGenerator(["BTC-USD"], seed=5, start_time_us=1_700_000_000_000_000).events(3000)
    )
    write_csv(folder, events)
    data = gzip.compress((folder / "incremental_book_L2.csv").read_bytes())
    cut = folder / "cut" / "incremental_book_L2.csv.gz"
    cut.parent.mkdir()
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


def test_a_gzip_recording_cut_short_is_an_error_naming_the_file(tmp_path):
    cut = cut_gzip(tmp_path, keep=0.5)
    # The broker is never reached: a full-speed replay reads the recording first.
    done = replay_cli("--source", f"csv:{cut.parent}", "--bootstrap", f"127.0.0.1:{free_port()}")
    line = error_line(done)
    assert done.returncode == EXIT_UNREADABLE, line
    assert f"cannot read {cut}: cut short after line " in line
    assert line.endswith("; nothing was published")


@pytest.mark.parametrize("name", ["book.csv", "book.csv.gz"])
def test_a_binary_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(Path(sys.executable).read_bytes()[:4096])
    done = replay_cli("--source", f"csv:{path}", "--bootstrap", f"127.0.0.1:{free_port()}")
    line = error_line(done)
    assert done.returncode == EXIT_UNREADABLE, line
    assert f"cannot read {path}: " in line
    assert re.search(r"not (UTF-8|gzip|CSV)", line), line


def test_an_unreachable_broker_is_an_error_within_a_bound(tmp_path):
    closed = f"127.0.0.1:{free_port()}"
    done = replay_cli("--count", "10", "--bootstrap", closed)
    line = error_line(done)
    assert done.returncode == EXIT_BROKER, line
    assert line.startswith(f"replay: broker {closed} unreachable: ")


def test_a_broker_that_never_answers_is_an_error_within_the_bound(tmp_path):
    # Connections complete (the kernel's backlog) but no request is ever answered.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        done = replay_cli("--count", "10", "--bootstrap", address)
        took_s = time.monotonic() - started
    line = error_line(done)
    assert done.returncode == EXIT_BROKER, line
    assert line == f"replay: broker {address} unreachable: no answer in 10 s"
    assert took_s < 30  # aiokafka alone waits 40 s per request


def test_sigterm_stops_a_replay_at_once_as_ctrl_c_does():
    # Waiting on a broker that never answers (10 s), as a container's first process is
    # asked to stop: it stops now, not when the grace period ends.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        replay = subprocess.Popen(
            [sys.executable, "-m", "feature_cache.replay", "--count", "0", "--speed", "1",
             "--bootstrap", f"127.0.0.1:{silent.getsockname()[1]}"],
            cwd=REPO, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(2.0)  # started and waiting (the interpreter's start, then the wait)
            replay.send_signal(signal.SIGTERM)
            stopped_s = time.monotonic()
            _, stderr = replay.communicate(timeout=5)
        finally:
            replay.kill()
    assert replay.returncode == EXIT_STOPPED
    assert stderr.strip() == "replay: stopped"
    assert time.monotonic() - stopped_s < 3


@pytest.mark.integration
def test_a_recording_of_malformed_lines_only_publishes_nothing_and_says_so(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    path = tmp_path / "book.csv"
    path.write_text(
        "exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount\n"
        "coinbase,BTC-USD,1,2,maybe,bid,1.0,1.0\n"
        "coinbase,BTC-USD,3,4,true,up,1.0,1.0\n"
    )
    done = replay_cli(
        "--source", f"csv:{path}", "--bootstrap", kafka_settings.bootstrap_servers,
        "--topic", kafka_settings.topic,
    )  # fmt: skip
    line = error_line(done)
    assert done.returncode == EXIT_NO_EVENTS, line
    assert line.startswith(f"replay: no events in csv:{path}: 2 lines, 2 malformed (book.csv:2: ")


@pytest.mark.integration
def test_a_recording_cut_short_mid_replay_says_what_was_published_before(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    cut = cut_gzip(tmp_path, keep=0.5)
    done = replay_cli(
        "--source", f"csv:{cut}", "--keep-times", "--bootstrap", kafka_settings.bootstrap_servers,
        "--topic", kafka_settings.topic,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == EXIT_UNREADABLE, done.stderr
    *_, line = done.stderr.splitlines()  # after the progress lines
    assert f"replay: cannot read {cut}: cut short after line " in line
    published = int(line.rsplit("; ", 1)[1].split()[0].replace(",", ""))
    assert published > 0, line  # streamed (--keep-times): some went out before the cut
