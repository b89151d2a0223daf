"""The decisions' timeline: steps, shares and fallback reasons over made-up records, and
the command on SQLite and PostgreSQL audit stores."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

from server.admin import ctl
from server.audit.__main__ import main as audit_main
from server.audit.migrate import upgrade
from server.audit.record import decode, encode
from server.audit.store import AuditStore, create_store_engine
from server.audit.timeline import Recorded, format_timeline, reason_kind, timeline
from tests.server.audit.conftest import decision_record

T0 = dt.datetime(2026, 11, 26, 11, 8, 6, 250_000, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


SKIPPED = "primary skipped: 0.0 ms of budget left (needs 5.2); cached score 24 ms old"
RECORDED = [
    Recorded(at(0.0), "PRIMARY", "primary answered in 4.8 ms", 4_918),
    Recorded(at(0.1), "PRIMARY", "primary answered in 5.1 ms", 5_200),
    Recorded(at(0.4), "CACHED_SCORE", SKIPPED, 120),
    # Stored by SQLite without its zone: the same UTC time.
    Recorded(at(0.6).replace(tzinfo=None), "CACHED_SCORE", SKIPPED.replace("24", "53"), 130),
    Recorded(at(0.7), "RULES", "primary forced open by on-call; rules: book leans -0.42", 90),
    # Nothing from 1.0 to 2.0 s.
    Recorded(at(2.1), "SECONDARY", "secondary answered in 7.0 ms", 7_500),
]


def test_a_reason_with_its_numbers_masked_is_one_cause_whatever_the_figures() -> None:
    assert reason_kind(SKIPPED) == (
        "primary skipped: # ms of budget left (needs #); cached score # ms old"
    )
    assert reason_kind("rules: book leans -0.42 toward buy") == "rules: book leans # toward buy"


def test_steps_count_sources_and_the_reasons_of_what_no_model_made() -> None:
    first, second, third = timeline(RECORDED, 0.5)
    # Steps start at multiples of the step; the empty ones are left out.
    assert [s.start for s in (first, second, third)] == [
        T0.replace(microsecond=0) + dt.timedelta(seconds=s) for s in (0.0, 0.5, 2.0)
    ]
    [minute] = timeline(RECORDED, 60.0)
    assert minute.start == T0.replace(second=0, microsecond=0) and minute.decisions == 6
    assert first.decisions == 2 and first.model_share == 1.0 and first.fallbacks == []
    assert second.by_source == {"CACHED_SCORE": 2, "RULES": 1}
    assert second.model_share == 0.0
    assert second.fallbacks == [
        (reason_kind(SKIPPED), 2),
        ("primary forced open by on-call; rules: book leans #", 1),
    ]
    assert (second.total_p50_ms, second.total_p99_ms) == (0.12, 0.13)
    assert third.by_source == {"SECONDARY": 1} and third.model_share == 1.0


def test_the_text_gives_each_step_a_line_with_its_most_frequent_reasons() -> None:
    lines = format_timeline(timeline(RECORDED, 0.5), reasons=1).splitlines()
    assert lines[0].startswith("step start (UTC)")
    assert lines[1] == "2026-11-26"  # and again before the first step of another day
    assert lines[3] == (
        "11:08:06.500       3  model   0.0 %     0.1 /    0.1 ms  CACHED_SCORE 2 RULES 1"
        f"  | 2 x {reason_kind(SKIPPED)}; 1 more reason"
    )
    assert lines[4].startswith("11:08:08.000       1  model 100.0 %     7.5 /    7.5 ms")
    after_midnight = Recorded(T0 + dt.timedelta(hours=13), "PRIMARY", "primary answered", 900)
    lines = format_timeline(timeline([*RECORDED, after_midnight], 0.5)).splitlines()
    assert lines[-2:] == ["2026-11-27", lines[-1]] and lines[-1].startswith("00:08:06.000")
    assert format_timeline([]) == "no recorded decision in that time"


def test_the_command_reads_the_audit_store(database_url, capsys) -> None:
    engine = create_store_engine(database_url)
    try:
        upgrade(engine)
        now_us = dt.datetime.now(dt.UTC).timestamp() * 1e6
        times = [int(now_us - 3e6 + n * 100_000) for n in range(10)]
        records = [decision_record(n, decided_at_us=t) for n, t in enumerate(times)]
        records[3] = decision_record(3, decided_at_us=times[3], source="RULES", reason=SKIPPED)
        AuditStore(engine).insert(decode(encode(r)) for r in records)
    finally:
        engine.dispose()

    assert audit_main(["--database-url", database_url, "timeline", "--since", "1m"]) == 0
    text = capsys.readouterr().out
    assert f"1 x {reason_kind(SKIPPED)}" in text
    assert sum(int(line.split()[1]) for line in text.splitlines()[2:]) == 10

    # decisionctl runs the same command.
    argv = ["timeline", "--database-url", database_url, "--since", "1m", "--step", "1m", "--json"]
    assert ctl.main(argv) == 0
    # One step, or two when the records straddle a minute's start.
    steps = json.loads(capsys.readouterr().out)
    assert sum(step["decisions"] for step in steps) == 10
    assert sum((Counter(step["by_source"]) for step in steps), Counter()) == {
        "PRIMARY": 9,
        "RULES": 1,
    }
    for step in steps:
        # Written to 4 places: 8 of 9 (records straddling a minute) reads 0.8889.
        want = step["by_source"].get("PRIMARY", 0) / step["decisions"]
        assert step["model_share"] == round(want, 4)

    # More than --limit: the newest, said first.
    assert audit_main(["--database-url", database_url, "timeline", "--limit", "4"]) == 0
    out, err = capsys.readouterr()
    assert "more than --limit 4 decisions in that time; these are the newest" in err
    assert sum(int(line.split()[1]) for line in out.splitlines()[2:]) == 4

    # Nothing in that time (the 15 minutes before an hour ago): said, and not a success.
    assert ctl.main(["timeline", "--database-url", database_url, "--until", "1h"]) == 2
    assert "no recorded decision" in capsys.readouterr().err
    assert (
        ctl.main(["timeline", "--database-url", database_url, "--since", "1m", "--until", "2m"])
        == 2
    )
    assert "is not before --until" in capsys.readouterr().err
    assert ctl.main(["timeline", "--database-url", database_url, "--reasons", "0"]) == 2
