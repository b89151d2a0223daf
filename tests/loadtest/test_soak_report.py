"""How the soak judges its windows (pure logic, answers written by hand)."""

from __future__ import annotations

import argparse

import pytest

from loadtest.soak import describe_late, fault_at
from loadtest.soak_report import (
    Answer,
    Bounds,
    Window,
    growth,
    judge,
    machine_drift,
    recovery_s,
    summarize,
)
from localstack.faults import CHAOS_GAP_S, Fault, chaos_plan


def answer(at_s: float, outcome: str = "PRIMARY", *, latency_ms: float = 5.0) -> Answer:
    late = outcome == "DEADLINE_EXCEEDED"
    return Answer(at_s, latency_ms, outcome, 80.0 if not late else -1.0, late)


def window(
    answers: list[Answer],
    *,
    fault: str = "",
    cpu: float = 5.0,
) -> Window:
    return summarize(
        answers,
        0.0,
        10.0,
        consumer_lag=0,
        workers_lost=0,
        processes={"kafka-broker": (cpu, 32.0), "feature-cache": (cpu, 56.0)},
        fault=fault,
    )


def test_a_steady_window_within_the_bounds_breaks_none():
    assert judge(window([answer(i / 100) for i in range(1000)]), Bounds()) == []


def test_one_late_answer_breaks_a_window_even_during_a_fault():
    answers = [answer(i / 100) for i in range(999)] + [answer(9.99, "DEADLINE_EXCEEDED")]
    assert judge(window(answers), Bounds()) == ["1 answers after the deadline"]
    assert judge(window(answers, fault="redis paused"), Bounds()) == [
        "1 answers after the deadline"
    ]


def test_model_share_and_p99_hold_outside_faults_only():
    answers = [
        answer(i / 100, "RULES" if i < 20 else "PRIMARY", latency_ms=40.0) for i in range(1000)
    ]
    broken = judge(window(answers), Bounds())
    assert broken == ["model share 98.0% < 99%", "p99 40.0 ms > 30 ms"]
    assert judge(window(answers, fault="primary paused"), Bounds()) == []


def test_growth_compares_the_last_part_with_the_first_above_a_floor():
    def run(first_cpu: float, last_cpu: float) -> list[Window]:
        windows = []
        for i in range(6):
            w = window([answer(0.0)], cpu=first_cpu if i < 3 else last_cpu)
            w.start_s, w.end_s = i * 10.0, (i + 1) * 10.0
            windows.append(w)
        return windows

    assert growth(run(10.0, 12.0), Bounds(), 30, {}) == []
    assert growth(run(10.0, 13.0), Bounds(), 30, {}) == [
        "kafka-broker CPU grew 10.0 -> 13.0",
        "feature-cache CPU grew 10.0 -> 13.0",
    ]
    assert growth(run(1.0, 2.4), Bounds(), 30, {}) == []  # under the 2 % floor: noise


def test_a_restarted_process_is_judged_from_its_last_start():
    # The broker restarted at 30 s (a stop) came back larger and stayed flat.
    windows = []
    for i in range(12):
        w = window([answer(0.0)], cpu=5.0)
        w.processes["kafka-broker"] = (5.0, 34.0 if i < 3 else 63.0)
        w.start_s, w.end_s = i * 10.0, (i + 1) * 10.0
        windows.append(w)
    assert growth(windows, Bounds(), 30, {}) == ["kafka-broker RSS grew 34.0 -> 63.0"]
    assert growth(windows, Bounds(), 30, {"kafka-broker": 30.0}) == []
    # Growth after the restart still counts; too little left after it to judge: nothing.
    windows[-1].processes["kafka-broker"] = (5.0, 120.0)
    assert growth(windows, Bounds(), 30, {"kafka-broker": 30.0}) == [
        "kafka-broker RSS grew 63.0 -> 82.0"
    ]
    assert growth(windows, Bounds(), 30, {"kafka-broker": 40.0}) == []


def test_recovery_is_the_first_second_after_the_fault_the_model_answers_again():
    answers = [answer(40.0 + i / 100, "RULES" if i < 250 else "PRIMARY") for i in range(1000)]
    assert recovery_s(answers, since_s=40.0) == 3.0
    assert recovery_s([answer(41.0, "ABSTAIN")], since_s=40.0) is None
    assert recovery_s([answer(39.0)], since_s=40.0) is None  # before the fault ended


def test_a_window_is_a_fault_window_until_it_has_settled():
    faults = [Fault("redis", 30.0, 30.0)]
    assert fault_at(faults, 20.0, 30.0, settle_s=10.0) == ""
    assert fault_at(faults, 30.0, 40.0, settle_s=10.0) == "redis paused"
    assert fault_at(faults, 60.0, 70.0, settle_s=10.0) == "redis paused"
    assert fault_at(faults, 70.0, 80.0, settle_s=10.0) == ""


@pytest.mark.parametrize("text", ["redis", "redis@30", "disk@30+30", "redis@x+30"])
def test_a_fault_is_target_at_start_plus_duration(text):
    with pytest.raises(argparse.ArgumentTypeError):
        Fault.parse(text)
    assert Fault.parse("broker@120+30") == Fault("broker", 120.0, 30.0)


def test_a_late_call_is_described_by_its_request_id_and_send_time():
    sent = 1_795_459_672.5  # 2026-11-23 18:47:52.500 UTC
    late = Answer(10.0, 50.4, "DEADLINE_EXCEEDED", -1.0, True, "", sent, "soak-7")
    assert describe_late(late) == ("soak-7 sent 18:47:52.500 UTC, DEADLINE_EXCEEDED after 50.4 ms")


def test_cpu_growth_is_judged_against_a_process_whose_work_is_fixed():
    def run(broker: tuple[float, float], replayer: tuple[float, float]) -> list[Window]:
        windows = []
        for i in range(6):
            part = 0 if i < 3 else 1
            w = window([answer(0.0)], cpu=broker[part])
            w.processes["replayer"] = (replayer[part], 47.0)
            w.start_s, w.end_s = i * 10.0, (i + 1) * 10.0
            windows.append(w)
        return windows

    # The whole machine ran 40 % slower at the end: the replayer's fixed work shows it.
    slower = run(broker=(5.0, 7.0), replayer=(5.0, 7.0))
    assert machine_drift(slower, part_s=30) == pytest.approx(1.4)
    assert growth(slower, Bounds(), 30, {}) == []
    # The broker alone grew.
    assert growth(run(broker=(5.0, 7.0), replayer=(5.0, 5.0)), Bounds(), 30, {}) == [
        "kafka-broker CPU grew 5.0 -> 7.0 (the replayer's x1.00)",
        "feature-cache CPU grew 5.0 -> 7.0 (the replayer's x1.00)",
    ]


def test_a_redis_restart_is_a_fault_without_duration_that_settles_as_the_others():
    fault = Fault.parse("redis-empty@50")
    assert fault == Fault("redis", 50.0, 0.0, "redis-empty")
    assert fault.label() == "redis restarted empty"
    with pytest.raises(argparse.ArgumentTypeError):
        Fault.parse("redis-empty@50+30")  # a restart has no duration
    assert fault_at([fault], 40.0, 50.0, settle_s=10.0) == ""
    assert fault_at([fault], 50.0, 60.0, settle_s=10.0) == "redis restarted empty"
    assert fault_at([fault], 60.0, 70.0, settle_s=10.0) == ""


@pytest.mark.parametrize(
    ("text", "fault", "label"),
    [
        ("kill:primary@60+10", Fault("primary", 60.0, 10.0, "kill"), "primary killed"),
        ("slow:secondary@5+30", Fault("secondary", 5.0, 30.0, "slow"), "secondary slowed"),
        ("stop:broker@9+5", Fault("broker", 9.0, 5.0, "stop"), "broker stopped"),
        ("kill-worker@70", Fault("decision", 70.0, 0.0, "kill-worker"), "a decision worker killed"),
    ],
)
def test_a_fault_names_its_action_and_reads_back_from_its_spec(text, fault, label):
    assert Fault.parse(text) == fault
    assert Fault.parse(fault.spec()) == fault
    assert fault.label() == label


@pytest.mark.parametrize(
    "text",
    [
        "kill:redis@1+2",
        "slow:broker@1+2",
        "stop:primary@1+2",
        "kill:primary@5",
        "kill-worker@5+5",
        "kill:primary@5+0",
        "primary@-5+10",
        "primary@5+-3",
        "primary@nan+1",
        "redis-empty@50+0",
        ":primary@5+1",
        "redis-empty:redis@5",
    ],
)
def test_a_fault_outside_its_actions_targets_or_form_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        Fault.parse(text)


def test_a_chaos_plan_repeats_with_its_seed_and_leaves_each_fault_time_to_recover():
    plan = chaos_plan(7, 3600.0, spare_s=20)
    assert plan == chaos_plan(7, 3600.0, spare_s=20) and plan != chaos_plan(8, 3600.0, spare_s=20)
    assert 10 <= len(plan) <= 25  # one every 2-4 minutes and its duration
    assert len({(f.action, f.target) for f in plan}) >= 6  # drawn from the whole set
    ends = [f.at_s + f.duration_s for f in plan]
    gaps = [b.at_s - end for end, b in zip(ends, plan[1:], strict=False)]
    assert all(CHAOS_GAP_S[0] - 1 <= gap <= CHAOS_GAP_S[1] + 1 for gap in gaps), gaps
    assert ends[-1] + 20 <= 3600.0  # the recovery bound and a window to spare
    assert all(Fault.parse(f.spec()) == f for f in plan)
    # A worker is killed only when there are workers to kill.
    assert all(
        f.action != "kill-worker" for s in range(20) for f in chaos_plan(s, 3600.0, spare_s=20)
    )
    assert any(
        f.action == "kill-worker"
        for s in range(20)
        for f in chaos_plan(s, 3600.0, spare_s=20, workers=2)
    )
