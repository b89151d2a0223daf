"""``python -m checks.fair_share``: one caller floods, another calls at a normal rate; what
each gets with the flood under a caller share and without one, side by side.

A decision server on Triton (the benchmark's ``Y``) with the default share
(``server.caller_share``, 16 calls in flight a process). The steady caller sends Decide at
``--rate`` (open loop, 50 ms deadline, its own ``client_id``); the flooder keeps 3 x the
share in flight over several connections (closed loop, 50 ms deadline): in one cell with
a ``client_id`` of its own (the share applies), in the other with none (no share: what
it was before). Each pair of cells runs ``--rounds`` times. Then the share check's own
cost, take and release, timed alone (docs/clients.md, "A fair share").

    python -m checks.fair_share --doc docs/clients.md
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
import timeit
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import uvloop

from decision_client import connect_async
from decision_client.v1 import decision_pb2
from loadtest import bench
from loadtest.feature_keeper import fresh_features
from loadtest.report import markdown_table, write_block
from server.admission import Caller, CallerShares
from server.settings import ServerSettings, Settings

DEADLINE_S = 0.05
SHARE = ServerSettings().caller_share
FLOOD = 3 * SHARE  # calls the flooder keeps in flight
CONNECTIONS = 4  # the flooder's: FLOOD over max_concurrent_streams (16) each, with room


def order(client_id: str) -> decision_pb2.DecideRequest:
    return decision_pb2.DecideRequest(
        symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1, client_id=client_id
    )


async def steady(address: str, rate: float, seconds: float) -> tuple[int, int]:
    """Calls sent and answered OK in time, at ``rate`` a second for ``seconds``."""
    async with connect_async(address) as client:
        await client.wait_ready(5)
        sent = ok = 0
        calls: list[asyncio.Task[None]] = []

        async def one() -> None:
            nonlocal ok
            try:
                await client.decide(order("steady"), timeout_s=DEADLINE_S)
                ok += 1
            except grpc.aio.AioRpcError:
                pass

        start = time.monotonic()
        while (due := start + sent / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            calls.append(asyncio.create_task(one()))
            sent += 1
        await asyncio.gather(*calls)
    return sent, ok


async def flooder(address: str, client_id: str, until: float) -> list[tuple[str, float]]:
    """(status, ms) of each call, ``FLOOD`` in flight until ``until``."""
    clients = [connect_async(address) for _ in range(CONNECTIONS)]
    for client in clients:
        await client.wait_ready(5)
    seen: list[tuple[str, float]] = []

    async def loop(index: int) -> None:
        client = clients[index % CONNECTIONS]
        while time.monotonic() < until:
            begun = time.perf_counter()
            try:
                await client.decide(order(client_id), timeout_s=DEADLINE_S)
                status = "OK"
            except grpc.aio.AioRpcError as error:
                status = error.code().name
            seen.append((status, (time.perf_counter() - begun) * 1000))

    try:
        await asyncio.gather(*(loop(i) for i in range(FLOOD)))
    finally:
        for client in clients:
            await client.close()
    return seen


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else float("nan")


def steady_process(address: str, rate: float, seconds: float, after_s: float) -> tuple[int, int]:
    time.sleep(after_s)  # the flood under way
    return uvloop.run(steady(address, rate, seconds))


def flooder_process(address: str, client_id: str, seconds: float) -> list[tuple[str, float]]:
    return uvloop.run(flooder(address, client_id, time.monotonic() + seconds))


def cell(
    pool: ProcessPoolExecutor, address: str, shared: bool, args: argparse.Namespace
) -> tuple[str, ...]:
    """The flooder and the steady caller in processes of their own (neither's event loop
    slows the other's calls)."""
    flood = pool.submit(flooder_process, address, "flooder" if shared else "", args.seconds + 1.0)
    sent, ok = pool.submit(steady_process, address, args.rate, args.seconds, 0.5).result()
    seen = flood.result()
    refused = [ms for status, ms in seen if status == "RESOURCE_EXHAUSTED"]
    answered = sum(status == "OK" for status, _ in seen)
    return (
        "with a share" if shared else "no share", f"{sent:,}", f"{100 * ok / sent:.2f} %",
        f"{len(seen) / (args.seconds + 1.0):,.0f}", f"{answered:,}", f"{len(refused):,}",
        f"{p99(refused):.2f}",
    )  # fmt: skip


async def measure(address: str, redis_url: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
    rows = []
    context = multiprocessing.get_context("spawn")
    async with fresh_features(redis_url, Settings().redis.key_prefix):
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            for round_ in range(1, args.rounds + 1):
                for shared in (True, False):
                    row = (str(round_), *await asyncio.to_thread(cell, pool, address, shared, args))
                    print(" | ".join(row), flush=True)
                    rows.append(row)
    return rows


def check_cost(pairs: int = 200_000) -> float:
    """Nanoseconds a take and release of one call cost, among 100 callers."""
    shares = CallerShares(SHARE, {})
    callers = [Caller(f"spiffe://trading/desk-{i}", True) for i in range(100)]

    def run() -> None:
        for i in range(pairs):
            caller = callers[i % 100]
            shares.take(caller, 1.0)
            shares.release(caller.key)

    return min(timeit.repeat(run, number=1, repeat=5)) / pairs * 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="the steady caller's calls/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="a cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, help="put the table in this doc's fair-share block")
    ours = parser.parse_args(argv)
    args, _ = bench.parse(["paths"])  # the bench's model server
    args.__dict__.update(vars(ours))
    with tempfile.TemporaryDirectory(prefix="fair-share-") as tmp:
        with bench.fleet_started(Path(tmp), ["Y"], args) as fleet:
            address = fleet.servers["on-triton"].address
            rows = uvloop.run(measure(address, fleet.redis_url, args))
    cost_ns = check_cost()
    header = ["round", "flooder", ">steady calls", ">steady in time", ">flooder calls/s",
              ">flooder answered", ">flooder refused", ">refusal p99 ms"]  # fmt: skip
    table = (
        f"Steady caller {args.rate:g}/s, flooder {FLOOD} in flight (3 x the share of "
        f"{SHARE}), {args.seconds:g} s a cell, {DEADLINE_S * 1000:g} ms deadlines:\n\n"
        f"{markdown_table(header, rows)}\n\nThe share check, take and release of a call: "
        f"{cost_ns:,.0f} ns."
    )
    print(f"\n{table}")
    if args.doc:
        write_block(args.doc, "fair-share", table)


if __name__ == "__main__":
    main()
