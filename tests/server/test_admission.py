"""The adaptive admission limit (pure logic: a fake clock and a scripted loop probe)."""

from __future__ import annotations

from server.admission import ADJUST_INTERVAL_S, AdmissionLimit


class Scripted:
    def __init__(self) -> None:
        self.now = 0.0
        self.share = 0.0  # of the recent time the loop's thread was busy

    def __call__(self) -> float:
        return self.now

    def busy_share(self, window_s: float) -> float:
        return self.share


def limit(script: Scripted, *, ceiling: int = 100) -> AdmissionLimit:
    return AdmissionLimit(
        max_in_flight=ceiling, min_in_flight=4, max_busy_share=0.85, lag=script, clock=script
    )


def tick(script: Scripted) -> None:
    script.now += ADJUST_INTERVAL_S


def test_a_loop_without_idle_moments_shrinks_the_limit_below_what_was_in_flight() -> None:
    script = Scripted()
    admission = limit(script)
    assert admission.admits(40, 1)  # the ceiling, 100
    script.share = 0.93
    tick(script)
    assert not admission.admits(40, 1)  # ¾ of the 40 in flight: 30
    assert admission.limit == 30.0
    tick(script)
    admission.admits(30, 1)
    assert admission.limit == 22.5


def test_the_limit_never_goes_below_its_floor_and_an_idle_server_admits() -> None:
    script = Scripted()
    admission = limit(script)
    script.share = 0.9
    for _ in range(50):
        tick(script)
        admission.admits(1, 1)
    assert admission.limit == 4.0
    assert admission.admits(0, 400)  # nothing in flight: even a batch past the limit


def test_a_floor_above_the_ceiling_never_lifts_the_limit_past_the_ceiling() -> None:
    script = Scripted()
    admission = AdmissionLimit(
        max_in_flight=2, min_in_flight=16, max_busy_share=0.85, lag=script, clock=script
    )
    script.share = 0.9
    for _ in range(5):
        tick(script)
        admission.admits(2, 1)
    assert admission.limit == 2.0
    assert not admission.admits(2, 1)


def test_a_punctual_loop_grows_a_used_limit_back_to_the_ceiling() -> None:
    script = Scripted()
    admission = limit(script)
    script.share = 0.9
    tick(script)
    admission.admits(20, 1)
    assert admission.limit == 15.0
    script.share = 0.6
    for _ in range(100):
        tick(script)
        admission.admits(int(admission.limit), 1)  # the limit is used
    assert admission.limit == 100.0


def test_an_unused_limit_does_not_grow() -> None:
    script = Scripted()
    admission = limit(script)
    script.share = 0.9
    tick(script)
    admission.admits(20, 1)
    script.share = 0.0
    for _ in range(20):
        tick(script)
        admission.admits(2, 1)  # light traffic: no evidence that more would be fine
    assert admission.limit == 15.0


def test_without_a_lag_probe_it_is_the_fixed_bound() -> None:
    admission = AdmissionLimit(max_in_flight=8, min_in_flight=1, max_busy_share=0.85, lag=None)
    assert admission.admits(7, 1)
    assert not admission.admits(8, 1)


def test_a_loop_busy_most_of_the_time_but_with_idle_moments_is_not_overload() -> None:
    script = Scripted()
    admission = limit(script)
    script.share = 0.8  # 200 of 250 ms: calls still reach their handlers at once
    for _ in range(10):
        tick(script)
        assert admission.admits(20, 1)
    assert admission.limit == 100.0
