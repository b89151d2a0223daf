"""The soak's levers: their spelling, and the check that every decision after a kill
switch engaged obeys it (pure logic, answers and audit rows written by hand)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loadtest.soak_levers import Decided, KillSwitch, Lever, LeverCheck, Obedience
from loadtest.soak_probe import audited_decisions
from loadtest.soak_report import Answer, decisions_of
from server.audit.migrate import upgrade
from server.audit.record import decode, encode
from server.audit.store import AuditStore, create_store_engine
from tests.server.audit.conftest import decision_record

ENGAGED = 1_795_459_672.5  # AdminService answered OK (2026-11-23 18:47:52.500 UTC)
SOL = KillSwitch("SOL-USD", ENGAGED - 0.004, ENGAGED)
KILLED = "kill switch for SOL-USD engaged by oncall: soak lever kill-switch:SOL-USD@60"


def decided(at: float, source: str = "ABSTAIN", *, symbol: str = "SOL-USD") -> Decided:
    decision = "ABSTAIN" if source == "ABSTAIN" else "TRADE"
    reason = KILLED if source == "ABSTAIN" else "primary answered in 2.1 ms"
    return Decided(symbol, at, decision, source, reason)


def test_a_lever_is_kind_scope_at_start():
    assert Lever.parse("kill-switch:SOL-USD@60") == Lever("kill-switch", "SOL-USD", 60.0)
    assert Lever.parse("kill-switch:*@0") == Lever("kill-switch", "*", 0.0)
    assert Lever.parse("kill-switch:SOL-USD@60").label() == "kill-switch:SOL-USD@60"


@pytest.mark.parametrize(
    "text",
    [
        "kill-switch:SOL-USD",  # no start
        "kill-switch@60",  # no scope
        "kill-switch:SOL-USD@soon",
        "breaker-open:primary@60",  # not a kind yet
        "kill-switch:DOGE-USD@60",  # the soak never sends it: nothing to check
    ],
)
def test_a_lever_that_is_not_one_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        Lever.parse(text)


def test_a_kill_switch_binds_its_symbol_from_the_engagement_and_covers_it_from_the_ask():
    assert SOL.binds("SOL-USD", ENGAGED) and not SOL.binds("SOL-USD", ENGAGED - 0.001)
    assert SOL.covers("SOL-USD", ENGAGED - 0.001) and not SOL.covers("SOL-USD", ENGAGED - 0.01)
    assert not SOL.binds("BTC-USD", ENGAGED + 1) and not SOL.covers("BTC-USD", ENGAGED + 1)
    everything = KillSwitch("*", ENGAGED, ENGAGED)
    assert everything.binds("BTC-USD", ENGAGED + 1) and everything.binds("SOL-USD", ENGAGED)


def test_only_an_abstain_from_abstain_with_a_kill_switch_reason_obeys():
    assert decided(ENGAGED).obeys_kill_switch()
    for source in ("PRIMARY", "SECONDARY", "CANARY", "CACHED_SCORE", "RULES"):
        assert not decided(ENGAGED, source).obeys_kill_switch()
    # An ABSTAIN for another reason: the switch was not what stopped it.
    stale = Decided("SOL-USD", ENGAGED, "ABSTAIN", "ABSTAIN", "features stale (2.4 s old)")
    assert not stale.obeys_kill_switch()
    assert not Decided("SOL-USD", ENGAGED, "TRADE", "ABSTAIN", KILLED).obeys_kill_switch()


def test_every_bound_decision_must_obey_and_the_earliest_offender_is_named():
    obedience = Obedience()
    first_batch = [
        decided(ENGAGED - 1.0, "PRIMARY"),  # before the engagement: free
        decided(ENGAGED + 0.5),
        decided(ENGAGED + 2.0, "PRIMARY", symbol="BTC-USD"),  # another symbol: free
    ]
    assert obedience.add(first_batch, [SOL]) == 0
    assert obedience.broken("answers") == []
    # Answers come in completion order: the earliest offender is not the first to come.
    late_batch = [
        decided(ENGAGED + 9.0, "RULES"),
        decided(ENGAGED + 7.25, "PRIMARY"),
        decided(ENGAGED + 8.0, "CACHED_SCORE"),
    ]
    assert obedience.add(late_batch, [SOL]) == 3
    assert (obedience.bound, obedience.disobeyed) == (4, 3)
    assert obedience.broken("answers") == [
        "3 of 4 answers after a kill switch engaged did not obey it; the first at"
        " 18:47:59.750 UTC, 7.2 s after the engagement, SOL-USD: PRIMARY TRADE"
        " (primary answered in 2.1 ms)"
    ]
    assert obedience.add([decided(ENGAGED + 9.0, "PRIMARY")], []) == 0  # none engaged


def test_the_soaks_answers_are_held_to_a_kill_switch_only_when_they_carry_a_decision():
    answers = [
        Answer(1.0, 3.0, "PRIMARY", 80.0, False, "d1", ENGAGED + 1, "r1", "SOL-USD", "TRADE", "x"),
        Answer(1.0, 50.1, "DEADLINE_EXCEEDED", -1.0, True, "", ENGAGED + 1, "r2", "SOL-USD"),
        Answer(1.0, 1.0, "RESOURCE_EXHAUSTED", -1.0, False, "", ENGAGED + 1, "r3", "SOL-USD"),
    ]
    check = LeverCheck([SOL])
    assert check.answers.add(decisions_of(answers), check.kill_switches) == 1
    assert check.answers.bound == 1  # a refusal or a late call decided nothing
    assert len(check.broken()) == 1 and check.broken()[0].startswith("1 of 1 answers")


def test_the_audit_store_rows_of_one_soak_are_held_to_the_kill_switch(tmp_path: Path):
    database = tmp_path / "audit.db"
    engine = create_store_engine(f"sqlite:///{database}")
    upgrade(engine)
    at_us = int((ENGAGED + 3.0) * 1e6)
    rows = [
        decision_record(1, request_id="soak-ab12-1", received_at_us=at_us, symbol="SOL-USD"),
        decision_record(
            2,
            request_id="soak-ab12-2",
            received_at_us=at_us,
            symbol="SOL-USD",
            decision="ABSTAIN",
            source="ABSTAIN",
            reason=KILLED,
        ),
        # Another soak's call, and another symbol's: not held to this switch.
        decision_record(3, request_id="soak-ffff-3", received_at_us=at_us, symbol="SOL-USD"),
        decision_record(4, request_id="soak-ab12-4", received_at_us=at_us, symbol="BTC-USD"),
    ]
    AuditStore(engine).insert([decode(encode(r)) for r in rows])
    engine.dispose()

    check = LeverCheck([SOL])
    check.audit.add(audited_decisions(database, "soak-ab12-"), check.kill_switches)

    assert (check.audit.bound, check.audit.disobeyed) == (2, 1)
    (line,) = check.broken()
    assert line.startswith(
        "1 of 2 audit rows after a kill switch engaged did not obey it; the first at"
        " 18:47:55.500 UTC, 3.0 s after the engagement, SOL-USD: PRIMARY TRADE"
    )
    assert check.summary()["audit_rows_disobeyed"] == 1
