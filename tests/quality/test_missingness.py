"""The missingness heatmap (quality/missingness.py, make data-quality)."""

from __future__ import annotations

import datetime as dt
import math
import subprocess
import sys

from feature_cache.schema import FEATURE_NAMES
from quality.missingness import LADDER_ROW, missingness, worst
from server.audit.migrate import upgrade
from server.audit.store import create_store_engine
from tests.server.audit.test_archive import insert, records

HOUR = dt.timedelta(hours=1)
T0 = dt.datetime(2026, 11, 30, 9, tzinfo=dt.UTC)
FULL = dict.fromkeys(FEATURE_NAMES, 1.0)


def row(symbol: str, at: dt.datetime, features, reason_code: str = "model_answered"):
    return {"symbol": symbol, "decided_at": at, "features": features, "reason_code": reason_code}


def test_shares_are_per_symbol_feature_and_step_and_the_ladder_has_a_row_of_its_own():
    rows = [
        row("BTC-USD", T0, FULL),
        row("BTC-USD", T0 + dt.timedelta(minutes=5), {**FULL, "ofi_5s": math.nan}),
        row("BTC-USD", T0 + dt.timedelta(minutes=7), {**FULL, "ofi_5s": None}),
        row("BTC-USD", T0 + dt.timedelta(minutes=9), None, "no_features"),
        # An hour with nothing, then SOL stale.
        row("SOL-USD", T0 + 2 * HOUR, FULL, "features_stale"),
        row("SOL-USD", T0 + 2 * HOUR, FULL),
    ]
    grid = missingness(rows, HOUR)
    assert grid.starts == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert grid.rows[: len(FEATURE_NAMES) + 1] == [
        ("BTC-USD", name) for name in (*FEATURE_NAMES, LADDER_ROW)
    ]
    assert grid.shares[("BTC-USD", "ofi_5s"), T0] == 0.75  # NaN, null and no features at all
    assert grid.shares[("BTC-USD", "spread_bps"), T0] == 0.25
    assert grid.shares[("BTC-USD", LADDER_ROW), T0] == 0.25
    assert grid.shares[("SOL-USD", LADDER_ROW), T0 + 2 * HOUR] == 0.5
    assert grid.shares[("SOL-USD", "spread_bps"), T0 + 2 * HOUR] == 0.0
    assert (("BTC-USD", "ofi_5s"), T0 + HOUR) not in grid.shares  # no decision: blank
    assert worst(grid) == [
        "2026-11-30 09:00:00 BTC-USD: 4 decisions, 25% on the ladder for want of features,"
        " ofi_5s missing in 75%",
        "2026-11-30 11:00:00 SOL-USD: 2 decisions, 50% on the ladder for want of features,"
        " spread_bps missing in 0%",
    ]


def test_the_command_draws_the_heatmap_from_the_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    day = dt.date(2026, 11, 28)
    insert(engine, records(day, 120))  # 2 hours, a decision a minute
    engine.dispose()
    out = tmp_path / "heatmap.png"
    command = [sys.executable, "-m", "quality.missingness", "--database-url", url,
               "--archive-url", str(tmp_path / "archive"), "--since", "2026-11-28T00:00",
               "--until", "2026-11-28T03:00", "--step", "1h", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"120 decisions, 2 steps; wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    command[command.index("--since") + 1] = "2026-11-29T00:00"
    command[command.index("--until") + 1] = "2026-11-29T03:00"
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "data-quality: no recorded decision in that time"
