"""Load results made up for the benchmarks' pure-logic tests."""

from __future__ import annotations

from loadtest.loadgen import LoadResult, LoadSpec, Mode, WorkerResult, new_histogram


def load_result(
    mode: Mode,
    load: float,
    *,
    ok: int,
    late: int = 0,
    model: float = 1.0,
    latency_us: int = 3_000,
    refused: int = 0,
    refusal_us: int = 1_000,
) -> LoadResult:
    """One process's run over one second: ``ok`` answers of ``latency_us`` each, ``model``
    of them from the primary and the rest from the rules, ``late`` DEADLINE_EXCEEDED and
    ``refused`` RESOURCE_EXHAUSTED after ``refusal_us`` each;
    ``load`` is the concurrency (closed loop) or the rate (open loop)."""
    histogram = new_histogram()
    for _ in range(ok):
        histogram.record_value(latency_us)
    refusals = new_histogram()
    for _ in range(refused):
        refusals.record_value(refusal_us)
    modelled = int(ok * model)
    worker = WorkerResult(
        histogram=histogram.encode(),
        refusals=refusals.encode(),
        ok=ok,
        errors={
            code: n
            for code, n in (("DEADLINE_EXCEEDED", late), ("RESOURCE_EXHAUSTED", refused))
            if n
        },
        answers={"SOURCE_PRIMARY": modelled, "SOURCE_RULES": ok - modelled},
        elapsed_s=1.0,
        cpu_s=0.1,
        pid=1,
    )
    spec = LoadSpec(
        target="decide",
        address="127.0.0.1:1",
        mode=mode,
        seconds=1.0,
        max_requests=100_000,
        concurrency=int(load) if mode == "closed" else 1,
        rate_per_s=load if mode == "open" else 0.0,
    )
    return LoadResult(spec, [worker])
