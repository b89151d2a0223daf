"""``python -m checks.floor``: what a Decide costs against the least its shape can cost.

The floor of a decision with one model call is a server that answers Decide after one
Triton ``ModelInfer`` and does nothing else: the ``relay`` here (uvloop, a generic handler,
the decision server's own OIP request). Beside the echo server (E, no model call), Decide
on Triton (Y) and DecideStream on Triton (Q), it takes the benchmark's servers and load
generator and measures each server's own CPU a call (its audit shipper apart) at a fixed
open-loop rate, or its throughput with a closed loop: twice, side by side
(docs/profile.md, "The floor").

    python -m checks.floor --rate 500          # open loop
    python -m checks.floor --closed 32         # saturated
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import uvloop

from core.processes import ManagedProcess, free_port, listening
from decision_client.v1 import decision_pb2
from feature_cache.schema import MODEL_INPUT_WIDTH
from loadtest import bench
from loadtest.feature_keeper import fresh_features
from loadtest.loadgen import LoadGenerator, LoadSpec, Target
from loadtest.report import markdown_table, write_block
from loadtest.soak_probe import group_cpu_seconds
from server.oip import oip_model_infer, oip_request
from server.settings import Settings
from torchserve.triton import TRITON_OIP_SERVICE

RELAY_ANSWER = decision_pb2.DecideResponse(
    decision=decision_pb2.DECISION_TRADE, source=decision_pb2.SOURCE_PRIMARY
)
MODEL_TIMEOUT_S = 0.025  # the decision server's model-call cap and queue timeout
WARMUP_S = 1.0
PATHS = {"E": "echo (floor without a model)", "R": "relay: one Triton call, nothing else",
         "Y": "Decide on Triton", "Q": "DecideStream on Triton"}  # fmt: skip


async def relay_server(port: int, channel: grpc.aio.Channel) -> grpc.aio.Server:
    """Started: answers Decide on loopback ``port`` after one ModelInfer on ``channel``."""
    infer = oip_model_infer(channel, TRITON_OIP_SERVICE)
    request = oip_request("champion", [[0.1] * MODEL_INPUT_WIDTH], queue_timeout_s=MODEL_TIMEOUT_S)

    async def decide(_: Any, __: Any) -> decision_pb2.DecideResponse:
        await infer(request, timeout=MODEL_TIMEOUT_S)
        return RELAY_ANSWER

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        decide,
        request_deserializer=decision_pb2.DecideRequest.FromString,
        response_serializer=decision_pb2.DecideResponse.SerializeToString,
    )
    service = grpc.method_handlers_generic_handler(
        "decision.v1.DecisionService", {"Decide": handler}
    )
    server.add_generic_rpc_handlers((service,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def relay(port: int, model_address: str) -> None:
    """The relay until SIGTERM or SIGINT."""
    async with grpc.aio.insecure_channel(model_address) as channel:
        server = await relay_server(port, channel)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(grace=0.5)


def spec(target: Target, address: str, args: argparse.Namespace) -> LoadSpec:
    if args.closed:
        return LoadSpec(target=target, address=address, mode="closed", seconds=args.seconds,
                        max_requests=10**8, concurrency=args.closed, timeout_s=1.0,
                        processes=args.processes, warmup_s=WARMUP_S)  # fmt: skip
    return LoadSpec(target=target, address=address, mode="open", seconds=args.seconds,
                    max_requests=10**8, rate_per_s=args.rate, timeout_s=0.05,
                    processes=args.processes, warmup_s=WARMUP_S)  # fmt: skip


async def measure(
    fleet: bench.Fleet, relay_at: tuple[str, int], generator: LoadGenerator, args: Any
) -> list[tuple[str, ...]]:
    """Each path in turn, ``args.rounds`` times: a row a path and round."""
    ways: dict[str, tuple[Target, str, int]] = {
        "E": ("echo", fleet.servers["echo"].address, fleet.servers["echo"].process.pid or 0),
        "R": ("echo", *relay_at),
        "Y": ("decide", fleet.servers["on-triton"].address,
              fleet.servers["on-triton"].process.pid or 0),
        "Q": ("stream", fleet.servers["on-triton"].address,
              fleet.servers["on-triton"].process.pid or 0),
    }  # fmt: skip
    rows: list[tuple[str, ...]] = []
    echo_us = float("nan")  # E's, measured first in each round
    async with fresh_features(fleet.redis_url, Settings().redis.key_prefix):
        for round_ in range(1, args.rounds + 1):
            for key, (target, address, pgid) in ways.items():
                before = group_cpu_seconds([pgid], bench.SHIPPER)
                result = await asyncio.to_thread(generator.run, spec(target, address, args))
                after = group_cpu_seconds([pgid], bench.SHIPPER)
                # The warm-up's CPU is in the figures, so its calls are in the divisor.
                calls = result.throughput_per_s * (args.seconds + WARMUP_S)
                own = [(a - b) * 1e6 / calls if calls else float("nan")
                       for a, b in zip(after, before, strict=True)]  # fmt: skip
                if key == "E":
                    echo_us = own[0]
                row = (f"{key} {PATHS[key]}", str(round_), f"{result.throughput_per_s:,.0f}",
                       f"{own[0]:,.0f}", f"{own[1]:,.0f}", f"{sum(own) / echo_us:.2f}",
                       f"{result.percentile_ms(99):.2f}", f"{result.error_count:,}")  # fmt: skip
                print(" | ".join(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="open loop: calls a second")
    parser.add_argument("--closed", type=int, default=0, help="closed loop of this many callers")
    parser.add_argument("--seconds", type=float, default=10.0, help="a cell")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, help="put the table in this doc's floor block")
    parser.add_argument("--relay", nargs=2, metavar=("PORT", "MODEL"), help=argparse.SUPPRESS)
    ours = parser.parse_args(argv)
    if ours.relay:  # the relay's own process
        uvloop.run(relay(int(ours.relay[0]), ours.relay[1]))
        return
    args, _ = bench.parse(["paths"])  # the bench's load generator and model server
    args.__dict__.update(vars(ours))
    generator = LoadGenerator(args.processes)
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        try:
            generator.start()
            with bench.fleet_started(Path(tmp), ["E", "X", "Y"], args) as fleet:
                port = free_port()
                argv_ = [sys.executable, "-m", "checks.floor", "--relay", str(port),
                         fleet.servers["triton"].address]  # fmt: skip
                proc = ManagedProcess(
                    "relay", argv_, cwd=bench.REPO, log_path=Path(tmp) / "relay.log"
                )
                proc.start()
                try:
                    proc.wait_ready(listening(port), 30)
                    generator.wait_ready()
                    rows = asyncio.run(measure(fleet, (f"127.0.0.1:{port}", proc.pid or 0),
                                               generator, args))  # fmt: skip
                finally:
                    proc.stop()
        finally:
            generator.stop()
    load = f"closed loop of {args.closed}" if args.closed else f"{args.rate:,.0f} calls/s open"
    header = ["path", ">round", ">answered /s", ">server µs a call", ">shipper µs",
              ">own / echo", ">p99 ms", ">errors"]  # fmt: skip
    table = f"{load}, {args.seconds:g} s a cell:\n\n{markdown_table(header, rows)}"
    print(f"\n{table}")
    if args.doc:
        write_block(args.doc, f"floor-{'closed' if args.closed else 'open'}", table)


if __name__ == "__main__":
    main()
