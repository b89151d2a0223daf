"""bench_paths' verdicts past capacity and its figures file (pure logic, over made-up
load results)."""

from __future__ import annotations

from loadtest.bench_paths import (
    Cell,
    Measured,
    compare,
    figures,
    losses,
    model_servers,
    targets,
)
from loadtest.loadgen import LoadResult
from tests.loadtest.made_up import load_result


def runs(
    *, late_at_top: int = 0, model_at_top: float = 0.9, refusal_us: int = 1_000
) -> dict[Cell, LoadResult]:
    """Every path saturated at 500/s, D's open loop at 0.5-1.5 x that: 100 refused at each
    point past capacity, and the top point (750/s) as given."""
    results: dict[Cell, LoadResult] = {}
    for path in ("E", "T", "D", "W", "F"):
        results[(path, "closed", 16.0)] = load_result("closed", 16, ok=500)
    for load in (250, 400, 500, 600):
        refused = 100 if load >= 500 else 0
        results[("D", "open", float(load))] = load_result(
            "open", load, ok=load - refused, refused=refused, refusal_us=refusal_us
        )
    results[("D", "open", 750.0)] = load_result(
        "open",
        750,
        ok=600,
        late=late_at_top,
        model=model_at_top,
        refused=150 - late_at_top,
        refusal_us=refusal_us,
    )
    return results


def verdict(text: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
    return line.rsplit("|", 2)[1].strip()


LATE = "D late answers at 0.5-1.5 x capacity"
REFUSAL = "D refusal p99 as the caller sees it"
AT_1_2 = "D model share of all calls at 1.2 x capacity"


def test_past_capacity_late_answers_slow_refusals_and_a_low_model_share_are_missed() -> None:
    good = targets(runs())
    assert [verdict(good, name) for name in (LATE, REFUSAL, AT_1_2)] == ["met"] * 3
    assert verdict(targets(runs(late_at_top=3)), LATE) == "missed"
    assert verdict(targets(runs(refusal_us=8_000)), REFUSAL) == "missed"
    # 500 of 600 calls at 1.2 x: the model answered 83 % of all calls; 100 refused.
    assert "| 83.33 % |" in next(line for line in good.splitlines() if AT_1_2 in line)


def test_a_low_model_share_at_1_2_x_capacity_is_missed() -> None:
    results = runs()
    results[("D", "open", 600.0)] = load_result("open", 600, ok=500, model=0.5, refused=100)
    assert verdict(targets(results), AT_1_2) == "missed"
    results[("D", "open", 400.0)] = load_result("open", 400, ok=400, model=0.9)
    assert verdict(targets(results), "D model share of all calls at 0.8 x capacity") == "missed"


def test_the_figures_file_compares_a_run_with_the_last() -> None:
    before = figures(Measured(runs(), {}, {}))
    after_runs = runs()
    after_runs[("D", "closed", 16.0)] = load_result("closed", 16, ok=400)
    text = compare(before, figures(Measured(after_runs, {}, {})))
    assert "D saturated 500 -> 400/s (-20%)" in text
    assert "D open 750: p99 3.00 -> 3.00 ms" in text


def test_workers_lost_are_named_by_cell_in_the_text_and_the_figures() -> None:
    lost: dict[Cell, int] = {("T", "open", 1000.0): 2, ("D", "closed", 16.0): 1}
    text = losses(lost)
    assert text.startswith("TorchServe workers lost: 3 (T open 1000/s 2, D closed c=16 1)")
    assert losses({}) == "TorchServe workers lost: none"
    figured = figures(Measured(runs(), {}, lost))
    assert figured["workers_lost"] == {"T open 1000/s": 2, "D closed c=16": 1}


def test_model_servers_side_by_side_give_capacity_per_core_and_latency_at_their_loads() -> None:
    results = runs()
    results[("X", "closed", 16.0)] = load_result("closed", 16, ok=2000)
    results[("X", "closed", 1.0)] = load_result("closed", 1, ok=600)
    results[("X", "open", 1000.0)] = load_result("open", 1000, ok=1000)
    results[("X", "open", 1600.0)] = load_result("open", 1600, ok=1600)
    cores: dict[Cell, float] = {("X", "closed", 16.0): 0.5, ("T", "closed", 16.0): 1.0}
    text = model_servers(Measured(results, cores, {}))
    triton = next(line for line in text.splitlines() if "X Triton direct" in line)
    assert triton.startswith("| Triton | X Triton direct | 2,000/s | 0.50 | 4,000/s |")
    assert triton.count(" / ") == 3  # c=1, 0.5 x and 0.8 x all measured
    torchserve = next(line for line in text.splitlines() if "T TorchServe direct" in line)
    assert "| 500/s | 1.00 | 500/s |" in torchserve
    assert "Y Decide on Triton" not in text  # not measured: no row
