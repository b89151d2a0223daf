"""The command line of ``python -m localkafka``."""

from __future__ import annotations

from pathlib import Path

import pytest

from localkafka.settings import parse_args


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    settings, level = parse_args(["--data-dir", str(tmp_path)])
    assert (settings.host, settings.port, settings.data_dir) == ("127.0.0.1", 19092, tmp_path)
    assert (settings.retention_ms, settings.segment_bytes) == (600_000, 16 * 1024 * 1024)
    assert settings.fsync_interval_ms == 1000
    assert settings.retention_check_interval_ms <= 60_000
    assert not settings.auto_create_topics
    assert settings.groups.initial_rebalance_delay_ms == 100
    assert level == "INFO"


def test_flags_set_the_settings(tmp_path: Path) -> None:
    settings, level = parse_args(
        [
            "--data-dir", str(tmp_path), "--port", "0", "--retention-ms", "-1",
            "--segment-bytes", "4096", "--auto-create-topics", "--log-level", "debug",
            "--initial-rebalance-delay-ms", "0",
        ]
    )  # fmt: skip
    assert (settings.port, settings.retention_ms, settings.segment_bytes) == (0, -1, 4096)
    assert settings.auto_create_topics and settings.groups.initial_rebalance_delay_ms == 0
    assert level == "DEBUG"


@pytest.mark.parametrize(
    "bad",
    [[], ["--segment-bytes", "1"], ["--fsync-interval-ms", "0"], ["--log-level", "LOUD"]],
)
def test_bad_arguments_exit_2(tmp_path: Path, bad: list[str]) -> None:
    argv = bad if not bad else ["--data-dir", str(tmp_path), *bad]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
