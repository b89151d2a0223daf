"""The soak harness against the whole local stack, as ``make run`` starts it: 12 s of
steady Decide load in 2-second windows with the stack's redis-server paused for 4 s of
it, and 6 s after the resume to see the model answer again (within the 10-s bound).

Asserted: no TorchServe worker lost; the soak's kill switch obeyed after every window;
every answered decision in the audit store, and
every answer the model did not give says why; the ladder abstains while Redis is paused
(the feature mirror's records go stale; no decision waits for Redis twice) and the model
answers again within 10 s of the resume; under 1 % of calls answered after the
deadline or refused. Reported, not asserted: the per-window bounds (model share ≥ 99 %, p99 ≤ 30 ms,
no late answer), which a busy 2-core machine does not meet every window yet (issue
"The whole stack stays healthy for hours").
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys

import pytest

from localstack.stack import LocalStack
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timed]

DURATION_S = 12  # a pause, and 6 s after it: the model answers again within 0-2 s (bound: 10)
# Features go stale 2 s (features.max_age_ms) into the pause: the ladder abstains for 2 s.
PAUSE = "redis@2+4"
WINDOW_S = 2  # a window wholly inside the pause, after the features went stale
WARMUP_S = 2  # the stack warmed its replicas up; the client's first calls are not judged


@pytest.mark.timeout(DURATION_S + 300)
def test_a_soak_with_a_redis_pause_loses_nothing_and_recovers(model_store, tmp_path):
    store, _ = model_store
    run_dir = tmp_path / "stack"
    summary_path = tmp_path / "soak.json"
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- generated:soak-windows -->\n<!-- /generated:soak-windows -->\n"
        "<!-- generated:soak-processes -->\n<!-- /generated:soak-processes -->\n"
    )
    command = [
        sys.executable, "-m", "loadtest.soak",
        "--duration-s", str(DURATION_S),
        "--warmup-s", str(WARMUP_S),
        "--fault", PAUSE,
        "--window-s", str(WINDOW_S),
        "--models", str(store),
        "--run-dir", str(run_dir),
        "--port-offset", str(LocalStack.free_offset(run_dir)),
        "--json", str(summary_path),
        "--doc", str(page),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=DURATION_S + 240, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1), output[-6000:]  # 1: a bound broken (reported)
    summary = json.loads(summary_path.read_text())
    (fault,) = summary["faults"]
    assert fault["recovery_s"] is not None and fault["recovery_s"] <= 10, output[-6000:]
    assert summary["workers_lost"] == 0
    # The soak's kill switch held through the pause (Redis lost nothing a server obeys).
    assert not [b for b in summary["broken"] if "lever lost" in b], summary["broken"]
    looks = re.search(r"lever: (\d+) looks answered", output)
    assert looks and int(looks[1]) >= DURATION_S // WINDOW_S, output[-6000:]
    assert summary["missing_from_audit"] == 0
    calls = sum(w["answers"] for w in summary["windows"])
    # A host stall of tens of ms may cost a few late answers or refusals, the designed
    # fast answers to a stall (CANCELLED: gRPC's queue limit; RESOURCE_EXHAUSTED: the
    # calls ahead would have made it late, docs/overload.md), never more than a few.
    refusals = ("CANCELLED", "RESOURCE_EXHAUSTED")
    refused = sum(w["outcomes"].get(code, 0) for w in summary["windows"] for code in refusals)
    assert summary["late"] + refused < 0.01 * calls, output[-6000:]
    assert calls >= 0.9 * 100 * DURATION_S
    outcomes = {name for w in summary["windows"] for name in w["outcomes"]}
    assert outcomes <= {
        "PRIMARY",
        "SECONDARY",
        "CACHED_SCORE",
        "RULES",
        "ABSTAIN",
        "DEADLINE_EXCEEDED",
        *refusals,
    }, outcomes
    paused = [w for w in summary["windows"] if w["fault"]]
    assert paused, "no window overlapped the Redis pause"
    # While Redis was paused no decision had features: the ladder abstained.
    assert any(w["outcomes"].get("ABSTAIN", 0) > 0.5 * w["answers"] for w in paused), output[-6000:]
    # The run's tables, in the page's generated blocks.
    written = page.read_text()
    assert "| minutes | steady windows |" in written and "redis paused at 2 s" in written
    assert "| decision-server | " in written, written
    # Every answer the model did not give says why, in the audit record.
    with sqlite3.connect(run_dir / "audit" / "audit.db") as db:
        reasons = db.execute(
            "SELECT count(*), sum(reason = '') FROM decisions WHERE source != 'PRIMARY'"
        ).fetchone()
        # A decision whose feature read timed out does not wait for Redis a second time.
        waited_twice = db.execute(
            "SELECT count(*) FROM decisions WHERE reason LIKE '%feature store timed out%'"
            " AND reason LIKE '%cached score lookup timed out%'"
        ).fetchone()[0]
        # The feature mirror kept answering while Redis was paused: the features it held
        # went stale, and only the cached-score lookup waited for Redis.
        stale_from_mirror = db.execute(
            "SELECT count(*) FROM decisions WHERE reason LIKE 'features stale%'"
            " AND reason LIKE '%cached score lookup timed out%'"
        ).fetchone()[0]
    assert reasons[0] > 0 and reasons[1] == 0, reasons
    assert waited_twice == 0 and stale_from_mirror > 0, (waited_twice, stale_from_mirror)
