"""Latency and throughput of four gRPC paths, measured in one run on this machine.

Starts its own redis-server, one TorchServe replica (primary, champion), the decision
server (AdminService on, a secondary address nobody listens on) and the bare echo server
as separate processes on free loopback ports, and drives them with ``loadtest.loadgen``
worker processes:

- E: the echo server's Decide (the floor: one Python gRPC hop, no work);
- T: TorchServe's ``Predictions`` called directly (the peer);
- X: Triton's OIP ``ModelInfer`` called directly, serving the same champion archive
  (``torchserve.triton``): the other model server;
- D: Decide through the whole chain (the product), one server process;
- Y: the same with its primary on Triton;
- W: the same with ``--workers 2`` (a second decision server, same Redis and replica);
- F: Decide with the primary and secondary breakers forced open through AdminService, so
  the fallback ladder answers.

Each path runs a closed-loop sweep (concurrency 1 up, each call with a 1 s deadline: the
saturated throughput) and an open loop at fixed rates, each call with the product's
50 ms deadline (``OPEN_LOOP_DEADLINE_S``): an answer that does not come in time counts
as DEADLINE_EXCEEDED in the errors column.
Every cell also measures the cores the path's own processes used (a decision server
with its model server, the model server alone). After those rounds, T, X and Y run open
loop at 0.5 and 0.8 of their own capacity, for a table of the two model servers side by
side (capacity, calls per core, p50/p99 at concurrency 1 and at those loads); and D runs
open loop at 0.5 to 1.5 times its measured capacity (its
saturated throughput with a model answering), the same number of rounds: past capacity
every call must still be answered in time or refused at once (gRPC's stream cap,
docs/overload.md), and the model must keep most of the answers. Open loop, every path
but W is called over one connection per load-generator process, as the caller's
contract asks; closed loop, over as many as its callers need to stay within the
server's stream cap (callers refused at once would only spin); W always over at least
``--channels``, so that both its workers get some (the kernel spreads connections, not
requests).
Runs are short and the paths alternate within each round, so machine noise lands on all
alike; a cell's rounds are merged (histograms added, throughput averaged). Prints a
markdown table, the performance targets as met or missed, and draws latency against
achieved throughput to a PNG. The figures go to a JSON file as well (``--json``); the
run is compared with the one the file held before. It also counts the workers the
TorchServe replica loses in each cell (its log says so): T's calls are cancelled at their
deadlines, which can cost TorchServe a worker, and the cells after that measure a
replica restarting its worker, or without one. Everything it starts is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from core.processes import free_ports, listening
from loadtest.bench_latency import BACKENDS, QUIET, echo_server, fresh_features
from loadtest.loadgen import LoadGenerator, LoadResult, LoadSpec, Mode, Target
from loadtest.report import (
    MODEL_SOURCES,
    answered_by,
    checkout_commit,
    load_text,
    model_share,
    model_share_of_calls,
)
from loadtest.soak_probe import group_cpu_seconds
from localstack.health import serving
from localstack.stack import started
from proto.decision.v1 import admin_pb2, admin_pb2_grpc, decision_pb2, decision_pb2_grpc
from server.settings import ServerSettings
from torchserve.replica import replica_dir, workers_lost

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-operator-token-0123456789"  # noqa: S105 - a throwaway local token
PATHS = ("E", "T", "X", "D", "Y", "W", "F")
PATH_NAMES = {
    "E": "E echo (floor)",
    "T": "T TorchServe direct",
    "X": "X Triton direct",
    "D": "D Decide",
    "Y": "Y Decide on Triton",
    "W": "W Decide, 2 workers",
    "F": "F Decide, breakers open",
}
PATH_TARGETS: dict[str, Target] = {
    "E": "echo",
    "T": "torchserve",
    "X": "oip",
    "D": "decide",
    "Y": "decide",
    "W": "decide",
    "F": "decide",
}
MODEL_PATHS = ("D", "Y", "W")  # paths whose answers should come from a model
MODEL_SERVER_PATHS = {"TorchServe": ("T", "D"), "Triton": ("X", "Y")}
"""Each model server's direct path and Decide path, compared side by side."""
SERVER_FACTORS = (0.5, 0.8)
"""T, X and Y run open loop at these multiples of their own capacity too."""
TARGET_RATE = 1000.0
CLOSED_LOOP_DEADLINE_S = 1.0
OPEN_LOOP_DEADLINE_S = 0.05  # what execution systems give a Decide
MIN_MODEL_SHARE = 0.95
"""A D figure stands for the model path only when a model gave this share of answers."""
CAPACITY_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)
"""D's open-loop points past the fixed rates, as multiples of its measured capacity."""
CALLS_PER_CONNECTION = ServerSettings().max_concurrent_streams
"""The decision servers' stream cap: calls one connection may have in flight."""
MODEL_SHARE_OF_CALLS = {0.8: 0.95, 1.2: 0.8}
"""The share of all D calls (refused ones included) the model must answer, by multiple
of D's capacity."""
MAX_REFUSAL_P99_MS = 5.0
"""A refused call's p99, as the caller sees it: at once, so it can go elsewhere."""
LOSS_SETTLE_S = 1.0
"""After the last cell, this long for TorchServe to log a worker its cancelled calls cost."""


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...]
    rates: tuple[float, ...]
    seconds: float
    rounds: int
    warmup_s: float


FULL = Plan((1, 4, 16, 64), (250.0, 500.0, 1000.0), seconds=2.0, rounds=2, warmup_s=0.5)
QUICK = Plan((1, 16), (250.0, 1000.0), seconds=1.0, rounds=1, warmup_s=0.3)
Cell = tuple[str, Mode, float]  # path, mode, concurrency or rate


class BreakerSwitch:
    """Turns D into F and back: both breakers forced open, or back on auto, through
    AdminService. Its two channels stay open for the whole run; every wait is bounded."""

    def __init__(self, admin_address: str, decide_address: str) -> None:
        self._admin_channel = grpc.aio.insecure_channel(admin_address)
        self._decide_channel = grpc.aio.insecure_channel(decide_address)
        self._forced_open: bool | None = None

    async def __aenter__(self) -> BreakerSwitch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Overrides left behind die with this run's own redis-server.
        for channel in (self._admin_channel, self._decide_channel):
            await asyncio.wait_for(channel.close(), timeout=5.0)

    async def prepare(self, path: str) -> None:
        """F needs both breakers forced open, D and W need them on auto (W's workers share
        the overrides through the same Redis); E and T care not."""
        if path in ("D", "W", "F") and self._forced_open != (path == "F"):
            await asyncio.wait_for(self._set(forced=path == "F"), timeout=20.0)

    async def _set(self, *, forced: bool) -> None:
        mode = admin_pb2.BREAKER_MODE_FORCE_OPEN if forced else admin_pb2.BREAKER_MODE_AUTO
        admin = admin_pb2_grpc.AdminServiceStub(self._admin_channel)
        for replica in ("primary", "secondary"):
            await admin.SetBreaker(
                admin_pb2.SetBreakerRequest(
                    replica=replica, mode=mode, reason="bench_paths: the F path"
                ),
                metadata=[("authorization", f"Bearer {TOKEN}")],
                timeout=5.0,
            )
        decide = decision_pb2_grpc.DecisionServiceStub(self._decide_channel).Decide
        request = decision_pb2.DecideRequest(
            symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1.0
        )
        # Overrides reach a replica through Redis, and back on auto a breaker that opened
        # by itself under load needs its reset time: wait until Decide shows the change.
        deadline = time.monotonic() + 15.0
        while True:
            response = await decide(request, timeout=1.0)
            source = decision_pb2.Source.Name(response.source)
            if (source in MODEL_SOURCES) != forced:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"breakers forced open={forced}, Decide still from {source}")
            await asyncio.sleep(0.05)
        self._forced_open = forced


@dataclass(frozen=True)
class Paths:
    echo: str
    torchserve: str
    decide: str
    admin: str
    decide_workers: str
    triton: str
    decide_triton: str
    process_groups: dict[str, tuple[int, ...]]
    """Per path, the process groups that serve it: their CPU is the path's cost."""

    def address(self, path: str) -> str:
        return {
            "E": self.echo,
            "T": self.torchserve,
            "X": self.triton,
            "Y": self.decide_triton,
            "W": self.decide_workers,
        }.get(path, self.decide)


def spec_for(paths: Paths, cell: Cell, plan: Plan, processes: int, channels: int = 1) -> LoadSpec:
    path, mode, load = cell
    processes = 1 if mode == "closed" and load == 1 else processes
    needed = math.ceil(load / processes / CALLS_PER_CONNECTION) if mode == "closed" else 1
    return LoadSpec(
        target=PATH_TARGETS[path],
        address=paths.address(path),
        mode=mode,
        seconds=plan.seconds,
        # A real bound, far above what two cores can send in the time.
        max_requests=int(plan.seconds * 50_000),
        concurrency=int(load) if mode == "closed" else 1,
        rate_per_s=load if mode == "open" else 0.0,
        warmup_s=plan.warmup_s,
        timeout_s=OPEN_LOOP_DEADLINE_S if mode == "open" else CLOSED_LOOP_DEADLINE_S,
        processes=processes,
        channels=max(needed, channels if path == "W" else 1),
    )


def cells(plan: Plan) -> list[Cell]:
    closed: list[Cell] = [(p, "closed", float(c)) for c in plan.concurrencies for p in PATHS]
    opened: list[Cell] = [(p, "open", r) for r in plan.rates for p in PATHS]
    return closed + opened


class Measured(NamedTuple):
    results: dict[Cell, LoadResult]
    server_cores: dict[Cell, float]
    """The cores the path's own processes kept busy while the cell ran (rounds averaged)."""
    workers_lost: dict[Cell, int]
    """TorchServe workers the replica lost during a cell, for the cells where it lost any:
    T's calls are cancelled at their deadline, and a cancelled call can cost TorchServe
    its worker (pytorch/serve 1888, 3087); the cells after such a loss met a replica
    restarting its worker, or left without one."""


async def measure(
    paths: Paths,
    generator: LoadGenerator,
    plan: Plan,
    redis_port: int,
    channels: int,
    replica_dir: Path,
) -> Measured:
    rounds: dict[Cell, list[LoadResult]] = defaultdict(list)
    cores: dict[Cell, list[float]] = defaultdict(list)
    lost: dict[Cell, int] = defaultdict(int)
    todo = cells(plan)
    extra = len(CAPACITY_FACTORS) + len(SERVER_FACTORS) * 3
    total, done = (len(todo) + extra) * plan.rounds, 0
    # The replica's count of lost workers, read at every cell's start and end: a loss
    # logged as a cell's channels close (their calls cancelled) or in the moment before
    # the next cell is charged to the cell that ended.
    counted = await asyncio.to_thread(workers_lost, replica_dir)
    last: Cell | None = None

    async def charge(cell: Cell | None) -> int:
        nonlocal counted
        now = await asyncio.to_thread(workers_lost, replica_dir)
        new, counted = max(0, now - counted), now  # max: a rolled log deleted
        if cell is not None and new:
            lost[cell] += new
        return new

    async def run(cell: Cell, r: int) -> None:
        nonlocal done, last
        await switch.prepare(cell[0])
        await charge(last)
        spec = spec_for(paths, cell, plan, generator.processes, channels)
        groups = paths.process_groups[cell[0]]
        cpu_before, began = group_cpu_seconds(groups), time.monotonic()
        result = await asyncio.to_thread(generator.run, spec)
        elapsed = time.monotonic() - began
        used = sum(group_cpu_seconds(groups)) - sum(cpu_before)
        cores[cell].append(used / elapsed if elapsed > 0 else math.nan)
        rounds[cell].append(result)
        done += 1
        row = describe_row(cell, result)
        if new := await charge(cell):
            row += f"; TorchServe lost {new} worker(s)"
        print(f"  [{done}/{total}] round {r + 1} {row}", flush=True)
        last = cell

    async with fresh_features(redis_port), BreakerSwitch(paths.admin, paths.decide) as switch:
        for r in range(plan.rounds):
            for cell in todo:
                await run(cell, r)
        so_far = {c: LoadResult.combine(rs) for c, rs in rounds.items()}
        capacity = saturated(so_far, "D")
        past: list[Cell] = [("D", "open", round(f * capacity)) for f in CAPACITY_FACTORS]
        print(f"  D's capacity: {capacity:,.0f}/s; open loop at {[c[2] for c in past]}/s")
        for path in ("T", "X", "Y"):
            own = saturated(so_far, path)
            past += [(path, "open", round(f * own)) for f in SERVER_FACTORS]
            print(f"  {path}'s capacity: {own:,.0f}/s")
        for r in range(plan.rounds):
            for cell in past:
                await run(cell, r)
    await asyncio.sleep(LOSS_SETTLE_S)
    await charge(last)
    combined = {cell: LoadResult.combine(results) for cell, results in rounds.items()}
    averaged = {cell: sum(each) / len(each) for cell, each in cores.items()}
    return Measured(combined, averaged, dict(lost))


def cell_text(cell: Cell) -> str:
    path, mode, load = cell
    return f"{path} {mode} {load_text(mode, load)}"


def losses(lost: dict[Cell, int]) -> str:
    if not lost:
        return "TorchServe workers lost: none"
    where = ", ".join(f"{cell_text(cell)} {n}" for cell, n in lost.items())
    return (
        f"TorchServe workers lost: {sum(lost.values())} ({where}): the cells after a loss"
        " met a replica restarting its worker, or without one"
    )


def describe_row(cell: Cell, result: LoadResult) -> str:
    return (
        f"{cell_text(cell)}: {result.throughput_per_s:,.0f}/s"
        f" p50 {result.percentile_ms(50):.2f} p99 {result.percentile_ms(99):.2f} ms"
        f" errors {result.error_count}, generator {result.generator_cores:.2f} cores"
    )


def table(results: dict[Cell, LoadResult], server_cores: dict[Cell, float]) -> str:
    lines = [
        "| path | mode | load | req/s | p50 ms | p99 ms | p999 ms | errors | refusal p99 ms"
        " | answered by | server cores | loadgen cores |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for cell, result in results.items():
        path, mode, load = cell
        errors = ", ".join(f"{k} {n}" for k, n in sorted(result.errors.items())) or "0"
        lines.append(
            f"| {PATH_NAMES[path]} | {mode} | {load_text(mode, load)}"
            f" | {result.throughput_per_s:,.0f} | {result.percentile_ms(50):.2f}"
            f" | {result.percentile_ms(99):.2f} | {result.percentile_ms(99.9):.2f}"
            f" | {errors} | {result.refusal_percentile_ms(99):.2f} | {answered_by(result)}"
            f" | {server_cores.get(cell, math.nan):.2f} | {result.generator_cores:.2f} |"
        )
    return "\n".join(lines)


def best_closed(results: dict[Cell, LoadResult], path: str) -> Cell:
    """The closed-loop cell of ``path`` that gave its saturated throughput."""
    return max(
        (cell for cell in results if cell[0] == path and cell[1] == "closed"),
        key=lambda cell: (
            results[cell].throughput_per_s
            * (model_share(results[cell]) if path in MODEL_PATHS else 1.0)
        ),
    )


def model_servers(measured: Measured) -> str:
    """Each model server's direct path and Decide path side by side: capacity, the cores
    its processes used there and calls per core, p50/p99 at concurrency 1 and open loop at
    0.5 and 0.8 of the path's own capacity."""
    results, cores = measured.results, measured.server_cores

    def latency(result: LoadResult | None) -> str:
        if result is None or not result.ok:
            return "-"
        return f"{result.percentile_ms(50):.2f} / {result.percentile_ms(99):.2f}"

    lines = [
        "| model server | path | capacity | cores there | per core | c=1 p50 / p99 ms"
        + "".join(f" | {f:g} x p50 / p99 ms" for f in SERVER_FACTORS)
        + " | model share of calls at 0.8 x |",
        "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(SERVER_FACTORS) + " ---: |",
    ]
    for server, pair in MODEL_SERVER_PATHS.items():
        for path in pair:
            capacity = saturated(results, path)
            if math.isnan(capacity):
                continue
            used = cores.get(best_closed(results, path), math.nan)
            opened = {f: results.get((path, "open", round(f * capacity))) for f in SERVER_FACTORS}
            at_08 = opened.get(0.8)
            share = (
                f"{100 * model_share_of_calls(at_08):.1f} %"
                if path in MODEL_PATHS and at_08 is not None
                else "-"
            )
            lines.append(
                f"| {server} | {PATH_NAMES[path]} | {capacity:,.0f}/s | {used:.2f}"
                f" | {capacity / used:,.0f}/s | {latency(results.get((path, 'closed', 1.0)))}"
                + "".join(f" | {latency(opened[f])}" for f in SERVER_FACTORS)
                + f" | {share} |"
            )
    return "\n".join(lines)


def saturated(results: dict[Cell, LoadResult], path: str) -> float:
    """The best closed-loop throughput; for D and W only the decisions a model made
    count, or an overloaded primary whose breaker opened would pass for a fast one."""
    return max(
        (
            r.throughput_per_s * (model_share(r) if path in MODEL_PATHS else 1.0)
            for (p, mode, _), r in results.items()
            if p == path and mode == "closed"
        ),
        default=math.nan,
    )


class Check(NamedTuple):
    name: str
    value: float
    unit: str
    bound: float
    upper: bool = True
    """Whether ``bound`` is an upper bound (else a lower one)."""
    model_share: float = 1.0
    """Of the D answers behind ``value``, the share a model gave."""

    def row(self) -> str:
        within = self.value <= self.bound if self.upper else self.value >= self.bound
        if math.isnan(self.value) or math.isnan(self.model_share):
            verdict = "not measured"
        elif self.model_share < MIN_MODEL_SHARE:
            # The fallback ladder answering for an overloaded model is not the model path.
            verdict = f"missed: the model answered only {100 * self.model_share:.0f} % of D"
        else:
            verdict = "met" if within else "missed"
            if self.model_share < 1.0:
                verdict += f" (model answered {100 * self.model_share:.1f} % of D)"
        op = "<=" if self.upper else ">="
        return (
            f"| {self.name} | {self.value:.2f} {self.unit} | {op} {self.bound:g} {self.unit}"
            f" | {verdict} |"
        )


def targets(results: dict[Cell, LoadResult]) -> str:
    def ms(path: str, mode: Mode, load: float, percent: float) -> float:
        result = results.get((path, mode, load))
        return result.percentile_ms(percent) if result else math.nan

    def from_model(mode: Mode, load: float) -> float:
        result = results.get(("D", mode, load))
        return model_share(result) if result else math.nan

    sat = {path: saturated(results, path) for path in PATHS}
    rate = TARGET_RATE
    d_minus_t = ms("D", "closed", 1, 50) - ms("T", "closed", 1, 50)
    f_over_e = ms("F", "open", rate, 99) / ms("E", "open", rate, 99)
    past = {f: results.get(("D", "open", round(f * sat["D"]))) for f in CAPACITY_FACTORS}
    never_late = [r for r in past.values() if r is not None]
    refused = [r for r in past.values() if r is not None and r.refused]
    checks = [
        Check(
            f"D late answers at {min(CAPACITY_FACTORS):g}-{max(CAPACITY_FACTORS):g} x capacity",
            sum(r.errors.get("DEADLINE_EXCEEDED", 0) for r in never_late)
            if never_late
            else math.nan,
            "calls",
            0,
        ),
        Check(
            "D refusal p99 as the caller sees it (worst cell)",
            max(r.refusal_percentile_ms(99) for r in refused) if refused else 0.0,
            "ms",
            MAX_REFUSAL_P99_MS,
        ),
        *(
            Check(
                f"D model share of all calls at {f:g} x capacity",
                100 * model_share_of_calls(r) if (r := past.get(f)) else math.nan,
                "%",
                100 * share,
                upper=False,
            )
            for f, share in MODEL_SHARE_OF_CALLS.items()
        ),
        Check("D p50 - T p50 at c=1", d_minus_t, "ms", 0.8, model_share=from_model("closed", 1)),
        Check("D saturated / E saturated", sat["D"] / sat["E"], "x", 0.3, upper=False),
        Check("W saturated / D saturated", sat["W"] / sat["D"], "x", 1.0, upper=False),
        Check(
            f"D p99 open {rate:g}/s",
            ms("D", "open", rate, 99),
            "ms",
            10.0,
            model_share=from_model("open", rate),
        ),
        Check(f"F p99 / E p99 open {rate:g}/s", f_over_e, "x", 2.0),
    ]
    lines = ["| target | measured | bound | verdict |", "| --- | ---: | ---: | --- |"]
    lines += [check.row() for check in checks]
    saturation = ", ".join(f"{path} {sat[path]:,.0f}/s" for path in PATHS)
    return "\n".join(lines) + (
        f"\n\nsaturated throughput (best closed loop; D: model answers only): {saturation}"
    )


def figures(measured: Measured) -> dict[str, Any]:
    """The run's figures as plain data: every cell, the saturated throughputs, the
    TorchServe workers lost."""
    results = measured.results
    commit = checkout_commit()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "saturated_per_s": {path: round(saturated(results, path), 1) for path in PATHS},
        "cells": [
            {
                "path": path,
                "mode": mode,
                "load": load,
                "per_s": round(r.throughput_per_s, 1),
                "p50_ms": round(r.percentile_ms(50), 3),
                "p99_ms": round(r.percentile_ms(99), 3),
                "p999_ms": round(r.percentile_ms(99.9), 3),
                "errors": r.errors,
                "model_share": round(model_share(r), 4),
                "model_share_of_calls": round(model_share_of_calls(r), 4),
                "refusal_p99_ms": round(r.refusal_percentile_ms(99), 3),
                "server_cores": round(measured.server_cores.get((path, mode, load), math.nan), 3),
            }
            for (path, mode, load), r in results.items()
        ],
        "workers_lost": {cell_text(cell): n for cell, n in measured.workers_lost.items()},
    }


def compare(before: dict[str, Any], now: dict[str, Any]) -> str:
    """Saturated throughput and p99 per cell against an earlier run's figures."""
    lines = [f"against the run of {before.get('when')} at {before.get('commit')}:"]
    earlier = before.get("saturated_per_s", {})
    for path, value in now["saturated_per_s"].items():
        if earlier.get(path):
            lines.append(
                f"  {path} saturated {earlier[path]:,.0f} -> {value:,.0f}/s"
                f" ({value / earlier[path] - 1:+.0%})"
            )
    old = {(c["path"], c["mode"], c["load"]): c for c in before.get("cells", [])}
    for cell in now["cells"]:
        prior = old.get((cell["path"], cell["mode"], cell["load"]))
        if prior and not math.isnan(prior["p99_ms"]) and not math.isnan(cell["p99_ms"]):
            lines.append(
                f"  {cell['path']} {cell['mode']} {cell['load']:g}: p99 {prior['p99_ms']:.2f}"
                f" -> {cell['p99_ms']:.2f} ms"
            )
    return "\n".join(lines)


def plot(results: dict[Cell, LoadResult], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), sharey=True)
    for ax, mode, what in zip(
        axes,
        ("closed", "open"),
        ("closed loop, concurrency 1 up", "open loop, fixed rates"),
        strict=True,
    ):
        for index, path in enumerate(PATHS):
            # In load order: past saturation, throughput can fall as load rises.
            points = sorted(
                (load, r.throughput_per_s, r.percentile_ms(50), r.percentile_ms(99))
                for (p, m, load), r in results.items()
                if p == path and m == mode and r.ok
            )
            if not points:
                continue
            loads, xs, p50s, p99s = zip(*points, strict=True)
            color = f"C{index}"
            ax.plot(xs, p50s, "o-", color=color, label=f"{PATH_NAMES[path]} p50")
            ax.plot(xs, p99s, "s--", color=color, alpha=0.7, label=f"{PATH_NAMES[path]} p99")
            if mode == "closed":
                for load, x, p50 in zip(loads, xs, p50s, strict=True):
                    label = f"c={load:g}"
                    ax.annotate(label, (x, p50), (3, -9), textcoords="offset points", fontsize=7)
        ax.set_yscale("log")
        if mode == "closed":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("achieved throughput (requests/s)")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def servers_started(run_dir: Path) -> Iterator[tuple[Paths, int, Path]]:
    """Starts every path's servers: redis-server, a TorchServe replica and a Triton (one
    stack each, on free ports), three decision servers and the echo server; yields the
    paths, the redis port and the TorchServe replica's folder; stops them all after."""
    decision_port, admin_port, echo_port, workers_port, workers_admin_port, on_triton_port = (
        free_ports(6)
    )
    with (
        started(run_dir, BACKENDS) as stack,
        started(run_dir / "triton", ("primary",), model_server="triton") as triton_stack,
    ):
        triton_address = f"127.0.0.1:{triton_stack.primary.grpc_inference}"
        admin_env = {"DECISION_ADMIN__TOKENS": f"bench operator {TOKEN}"}
        # One fleet: the servers share one audit store (the control state's one copy), as
        # a deployment does.
        one_store = {"DECISION_AUDIT__DATABASE_URL": f"sqlite:///{run_dir / 'audit.db'}"}
        servers = {
            "decision": (decision_port, run_dir, {
                **admin_env, **one_store, "DECISION_ADMIN__PORT": str(admin_port)}),
            "workers": (workers_port, run_dir / "workers", {
                **admin_env, **one_store, "DECISION_ADMIN__PORT": str(workers_admin_port),
                "DECISION_SERVER__WORKERS": "2"}),
            "triton": (on_triton_port, run_dir / "on-triton", {
                **one_store, "DECISION_TORCHSERVE__PRIMARY_ADDRESS": triton_address,
                # Triton speaks OIP; its answers carry version "1".
                "DECISION_TORCHSERVE__PROTOCOL": "kserve-v2"}),
        }  # fmt: skip
        procs = {
            name: stack.decision_server(
                f"decision-server-{name}", port, state_dir, {**QUIET, **env}
            )
            for name, (port, state_dir, env) in servers.items()
        }
        echo = echo_server(echo_port, run_dir)
        try:
            for proc in (*procs.values(), echo):
                proc.start()
            for name, server in procs.items():
                server.wait_ready(functools.partial(serving, servers[name][0]), 30)
            echo.wait_ready(listening(echo_port), 30)
            torchserve = stack.processes["torchserve-primary"]
            triton = triton_stack.processes["triton-primary"]
            groups = {
                "E": (echo,),
                "T": (torchserve,),
                "X": (triton,),
                "D": (procs["decision"], torchserve),
                "Y": (procs["triton"], triton),
                "W": (procs["workers"], torchserve),
                "F": (procs["decision"],),
            }

            def at(port: int) -> str:
                return f"127.0.0.1:{port}"

            paths = Paths(
                echo=at(echo_port),
                torchserve=at(stack.primary.grpc_inference),
                decide=at(decision_port),
                admin=at(admin_port),
                decide_workers=at(workers_port),
                triton=triton_address,
                decide_triton=at(on_triton_port),
                process_groups={
                    path: tuple(proc.pid or 0 for proc in members)
                    for path, members in groups.items()
                },
            )
            yield paths, stack.redis_port, replica_dir(run_dir, "primary")
        finally:
            for proc in (echo, *reversed(procs.values())):
                proc.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs: a smoke check")
    parser.add_argument("--seconds", type=float, help="measured seconds per run and round")
    parser.add_argument("--rounds", type=int, help="rounds over every path and load")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--channels", type=int, default=4, help="connections per load generator process"
    )
    parser.add_argument(
        "--out", type=Path, help="PNG path (default docs/img/bench_paths.png; with --quick .run/)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="figures file, compared with before it is replaced (default"
        " docs/bench_paths.json; with --quick .run/)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(
        plan, seconds=args.seconds or plan.seconds, rounds=args.rounds or plan.rounds
    )
    default_out = ".run/bench_paths-quick.png" if args.quick else "docs/img/bench_paths.png"
    out: Path = args.out or REPO / default_out
    default_json = ".run/bench_paths-quick.json" if args.quick else "docs/bench_paths.json"
    json_path: Path = args.json or REPO / default_json

    # SIGTERM's default ends the process without `finally`, leaving every server behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    generator = LoadGenerator(args.processes)
    with tempfile.TemporaryDirectory(prefix="bench-paths-") as tmp:
        try:
            # The workers import while TorchServe boots.
            generator.start()
            print(
                "starting redis-server, TorchServe, Triton, the decision servers, the echo"
                " server …",
                flush=True,
            )
            with servers_started(Path(tmp)) as (paths, redis_port, replica_folder):
                generator.wait_ready()
                runs = len(cells(plan)) * plan.rounds
                print(
                    f"measuring {runs} runs of {plan.seconds:g} s (+{plan.warmup_s:g} s"
                    f" warm-up) with {args.processes} load generator processes"
                    f" of {args.channels} connections each",
                    flush=True,
                )
                measured = asyncio.run(
                    measure(paths, generator, plan, redis_port, args.channels, replica_folder)
                )
        finally:
            generator.stop()

    results = measured.results
    print()
    print(table(results, measured.server_cores))
    print()
    print(model_servers(measured))
    print()
    print(targets(results))
    print(losses(measured.workers_lost))
    plot(results, out, f"gRPC paths on this machine ({plan.rounds} x {plan.seconds:g} s per point)")
    now = figures(measured)
    if json_path.exists():
        print()
        print(compare(json.loads(json_path.read_text()), now))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(now, indent=1) + "\n")
    print(f"\nplot: {out}; figures: {json_path}; whole run {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
