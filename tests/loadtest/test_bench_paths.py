"""bench_paths' verdicts past capacity and its figures file (pure logic, over made-up
load results)."""

from __future__ import annotations

from loadtest.bench_paths import Cell, Measured, compare, figures, losses, targets
from loadtest.loadgen import LoadResult
from tests.loadtest.made_up import load_result


def runs(*, late_at_top: int, model_at_top: float) -> dict[Cell, LoadResult]:
    results: dict[Cell, LoadResult] = {}
    for path in ("E", "T", "D", "W", "F"):
        results[(path, "closed", 16.0)] = load_result("closed", 16, ok=500)
    results[("D", "open", 250.0)] = load_result("open", 250, ok=250)
    results[("D", "open", 500.0)] = load_result("open", 500, ok=500)  # 1.0 x the capacity of 500/s
    results[("D", "open", 600.0)] = load_result(
        "open", 600, ok=600, late=late_at_top, model=model_at_top
    )
    return results


def verdict(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
    return line.rsplit("|", 2)[1].strip()


def test_past_capacity_late_answers_and_a_low_model_share_are_missed() -> None:
    good = targets(runs(late_at_top=0, model_at_top=0.85))
    assert verdict(good, "D late answers, open loop up to 600/s") == "met"
    assert verdict(good, "D model share at 600/s") == "met"
    bad = targets(runs(late_at_top=3, model_at_top=0.5))
    assert verdict(bad, "D late answers, open loop up to 600/s") == "missed"
    assert verdict(bad, "D model share at 600/s") == "missed"


def test_the_figures_file_compares_a_run_with_the_last() -> None:
    before = figures(Measured(runs(late_at_top=0, model_at_top=0.9), {}))
    after_runs = runs(late_at_top=0, model_at_top=0.9)
    after_runs[("D", "closed", 16.0)] = load_result("closed", 16, ok=400)
    text = compare(before, figures(Measured(after_runs, {})))
    assert "D saturated 500 -> 400/s (-20%)" in text
    assert "D open 600: p99 3.00 -> 3.00 ms" in text


def test_workers_lost_are_named_by_cell_in_the_text_and_the_figures() -> None:
    lost: dict[Cell, int] = {("T", "open", 1000.0): 2, ("D", "closed", 16.0): 1}
    text = losses(lost)
    assert text.startswith("TorchServe workers lost: 3 (T open 1000/s 2, D closed c=16 1)")
    assert losses({}) == "TorchServe workers lost: none"
    figured = figures(Measured(runs(late_at_top=0, model_at_top=0.9), lost))
    assert figured["workers_lost"] == {"T open 1000/s": 2, "D closed c=16": 1}
