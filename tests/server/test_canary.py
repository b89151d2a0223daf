"""CanaryMonitor's judging (pure logic; the canary with real replicas is in
tests/server/admin/test_admin.py)."""

from __future__ import annotations

import asyncio

import pytest

from server.control import canary as canary_module
from server.control.canary import CANARY, CHAMPION, CHECK_INTERVAL_S, CanaryMonitor
from server.settings import CanarySettings


class Deployment:
    """The canary setting as every server sees it, and the rollbacks asked for."""

    def __init__(self) -> None:
        self.current: object = ("weight", 0.5)
        self.breaches: list[str] = []

        self.auto_rollback = True

    def setting(self) -> object:
        return self.current

    def enabled(self) -> bool:
        return self.auto_rollback

    async def roll_back(self, breach: str) -> bool:
        self.breaches.append(breach)
        self.current = ("weight", 0.0)
        return True


@pytest.fixture(autouse=True)
def few_decisions_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(canary_module, "MIN_DECISIONS", 10)
    monkeypatch.setattr(canary_module, "PSI_MIN_SCORES", 15)


def monitor(deployment: Deployment) -> CanaryMonitor:
    return CanaryMonitor(CanarySettings(), deployment)


def record(canary: CanaryMonitor, side: str, n: int, *, ok: bool = True) -> None:
    for _ in range(n):
        canary.record(side, ok=ok, elapsed_ms=2.0, fell_back=False, scores=(0.5,))


async def test_a_failing_canary_is_rolled_back_once() -> None:
    deployment = Deployment()
    canary = monitor(deployment)
    record(canary, CHAMPION, 20)
    record(canary, CANARY, 20, ok=False)
    assert (canary.breach() or "").startswith("error/timeout rate 100%")
    await asyncio.sleep(CHECK_INTERVAL_S * 4)
    assert len(deployment.breaches) == 1
    # The rollback changed the setting: the windows were started afresh.
    assert canary.compare().canary.decisions == 0
    await canary.stop()


async def test_a_setting_changed_elsewhere_starts_the_windows_afresh() -> None:
    deployment = Deployment()
    canary = monitor(deployment)
    record(canary, CHAMPION, 20)
    record(canary, CANARY, 5, ok=False)
    await asyncio.sleep(CHECK_INTERVAL_S * 2)
    assert canary.compare().canary.decisions == 5  # the same setting: kept
    deployment.current = ("weight", 0.2)  # another server's change, synced here
    await asyncio.sleep(CHECK_INTERVAL_S * 2)
    # The failures under the old weight are not held against the new one.
    record(canary, CANARY, 5, ok=False)
    record(canary, CANARY, 10)
    record(canary, CHAMPION, 20)
    assert canary.compare().canary.decisions == 15
    assert canary.breach() is not None  # 33 % errors under this weight: still judged
    await canary.stop()


async def test_too_few_decisions_are_not_judged() -> None:
    deployment = Deployment()
    canary = monitor(deployment)
    record(canary, CHAMPION, 20)
    record(canary, CANARY, 9, ok=False)
    await asyncio.sleep(CHECK_INTERVAL_S * 2)
    assert canary.breach() is None and deployment.breaches == []
    await canary.stop()


async def test_a_canary_is_promotable_only_once_judged_without_a_breach() -> None:
    canary = monitor(Deployment())
    record(canary, CHAMPION, 20)
    record(canary, CANARY, 9)
    assert canary.why_not_promote(canary.compare()) == (
        "not judged yet: in the last 30 s under the weight now set, error rate, p99 and"
        " fallback rate wait for 10 decisions a side (canary 9, champion 20); score PSI"
        " waits for 15 scores a side (canary 9, champion 20)"
    )
    # Enough decisions for three limits, too few scores for the PSI: still not judged
    # (before, "judged, no breach": a promotion then skipped the PSI limit).
    record(canary, CANARY, 1)
    comparison = canary.compare()
    assert comparison.score_psi is None
    assert canary.why_not_promote(comparison) == (
        "not judged yet: in the last 30 s under the weight now set, score PSI waits for 15"
        " scores a side (canary 10, champion 20)"
    )
    record(canary, CANARY, 5)
    assert canary.compare().score_psi is not None
    assert canary.why_not_promote(canary.compare()) is None
    record(canary, CANARY, 15, ok=False)
    assert (canary.why_not_promote(canary.compare()) or "").startswith(
        "the canary breaches a limit: error/timeout rate 50%"
    )
    await canary.stop()


async def test_a_breach_of_a_limit_evaluated_rolls_back_before_the_psi_can_be() -> None:
    deployment = Deployment()
    canary = monitor(deployment)
    record(canary, CHAMPION, 12)
    record(canary, CANARY, 12, ok=False)
    assert canary.compare().score_psi is None
    assert (canary.breach() or "").startswith("error/timeout rate 100%")
    await canary.stop()
