"""How late an event loop wakes while every core is busy, with and without a short CPU
slice (``core.cpu_slice``), measured side by side.

    python -m loadtest.bench_cpu_slice [--rounds 6] [--round-s 5] [--slice-us 100 300]

CPU-bound processes at the same nice value as the probe (by default one per core, as
the TorchServe JVMs and the load keep them) keep every core busy. A probe process runs
an asyncio loop like the decision server's: it sleeps 5 ms, does 0.3 ms of work (a
request's worth), and records how late each wake came. Each round runs one probe per
arm (the kernel's default slice, then each requested slice) in turn, so that a busier
minute of the shared machine falls on every arm alike.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from core.cpu_slice import current_slice_us, request_cpu_slice
from core.stats import percentile

INTERVAL_S = 0.005
WORK_S = 0.0003


def _hog(stop: Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _probe(seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    late_ms: list[float] = []
    end = loop.time() + seconds
    while loop.time() < end:
        due = loop.time() + INTERVAL_S
        await asyncio.sleep(INTERVAL_S)
        late_ms.append((loop.time() - due) * 1000)
        _busy(WORK_S)
    return late_ms


def _probe_process(slice_us: int, seconds: float, out: Connection) -> None:
    if slice_us:
        result = request_cpu_slice(slice_us)
        if not result.applied:
            out.send(("refused", result.why_not))
            return
    out.send((current_slice_us(), asyncio.run(_probe(seconds))))


def _run_probe(slice_us: int, seconds: float) -> tuple[int | None, list[float]]:
    receive, send = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.Process(target=_probe_process, args=(slice_us, seconds, send))
    proc.start()
    got = receive.recv()
    proc.join()
    if got[0] == "refused":
        raise SystemExit(f"the kernel did not take a {slice_us} µs slice: {got[1]}")
    return got[0], got[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-s", type=float, default=5.0, help="seconds per arm per round")
    parser.add_argument("--slice-us", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    arms = [0, *args.slice_us]
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_hog, args=(stop,)) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    samples: dict[int, list[float]] = {arm: [] for arm in arms}
    reported: dict[int, int | None] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for arm in arms:
                reported[arm], late = _run_probe(arm, args.round_s)
                samples[arm].extend(late)
            print(f"round {round_no}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for hog in hogs:
            hog.join()
    print(f"{args.hogs} CPU-bound processes on {os.cpu_count()} cores; probe wakes every 5 ms")
    print(f"{'slice':>14} {'wakes':>6} {'p50 ms':>7} {'p99 ms':>7} {'p99.9 ms':>8} {'max ms':>7}")
    for arm in arms:
        late = samples[arm]
        name = f"{reported[arm]} µs" + (" (default)" if arm == 0 else "")
        print(
            f"{name:>14} {len(late):>6} {statistics.median(late):>7.2f}"
            f" {percentile(late, 0.99):>7.2f} {percentile(late, 0.999):>8.2f} {max(late):>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
