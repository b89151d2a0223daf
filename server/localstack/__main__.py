"""``make run``: the local stack on DESIGN.md's ports, stopped cleanly by Ctrl-C.

Starts redis-server, the primary and secondary TorchServe replicas, the decision server
and a feature keeper for the default symbols; waits until the server reports SERVING;
prints how to call it; on SIGINT or SIGTERM stops everything in reverse order, each
process through its own process group. Run-time files go under ``.run/``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feature_cache.store import FeatureWriter
from server.localstack.feature_keeper import FeatureKeeper
from server.localstack.processes import ManagedProcess, ProcessStartError, port_open
from server.localstack.redis_server import start_redis
from server.localstack.torchserve_replica import (
    PRIMARY_PORTS,
    SECONDARY_PORTS,
    start_replica,
    torchserve_replica,
)
from torchserve.archive import build_archive

log = logging.getLogger("localstack")

DEFAULT_SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD")
REPO = Path(__file__).resolve().parents[2]


def _say(message: str) -> None:
    print(message, flush=True)


def _usage(decision_port: int, admin_port: int) -> str:
    return f"""
Decision service ready on 127.0.0.1:{decision_port}  (Ctrl-C stops everything)

  Python:
    import grpc
    from proto.decision.v1 import decision_pb2 as pb, decision_pb2_grpc as rpc
    stub = rpc.DecisionServiceStub(grpc.insecure_channel("127.0.0.1:{decision_port}"))
    print(stub.Decide(pb.DecideRequest(symbol="BTC-USD", side=pb.SIDE_BUY, quantity=1),
                      timeout=0.05))

  grpcurl (uses server reflection):
    grpcurl -plaintext -max-time 0.05 \\
      -d '{{"symbol":"BTC-USD","side":"SIDE_BUY","quantity":1}}' \\
      127.0.0.1:{decision_port} decision.v1.DecisionService/Decide

  Logs: {REPO / ".run"}/*/  (admin port {admin_port} arrives with the AdminService)
"""


def _server_serving(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="decision.v1.DecisionService"), timeout=1
            )
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


async def run(args: argparse.Namespace) -> int:
    offset = args.port_offset
    run_dir: Path = args.run_dir
    decision_port, redis_port = 50051 + offset, 16379 + offset
    primary, secondary = PRIMARY_PORTS.shifted(offset), SECONDARY_PORTS.shifted(offset)
    busy = [
        p
        for p in (decision_port, redis_port, primary.grpc_inference, secondary.grpc_inference)
        if port_open("127.0.0.1", p)
    ]
    if busy:
        _say(f"ports already in use: {busy}; is another stack running? (--port-offset N moves it)")
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    started: list[ManagedProcess] = []
    keeper: FeatureKeeper | None = None
    client: aioredis.Redis | None = None
    try:
        _say("[1/5] building the model archive")
        store = run_dir / "model-store"
        archive = await asyncio.to_thread(build_archive, store, model_name="champion", seed=0)
        _say(f"      champion version {archive.version[:16]}…")

        _say(f"[2/5] redis-server on 127.0.0.1:{redis_port}")
        started.append(await asyncio.to_thread(start_redis, redis_port, run_dir / "redis"))

        _say(
            f"[3/5] TorchServe primary :{primary.grpc_inference},"
            f" secondary :{secondary.grpc_inference}"
        )
        replicas = [
            (torchserve_replica(name, ports, store, run_dir), ports)
            for name, ports in (("primary", primary), ("secondary", secondary))
        ]
        for proc, _ in replicas:
            started.append(proc)
            proc.start()  # both JVMs boot in parallel
        for proc, ports in replicas:
            await asyncio.to_thread(start_replica, proc, ports)

        _say("[4/5] feature keeper for " + ", ".join(DEFAULT_SYMBOLS))
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
        keeper = FeatureKeeper(
            FeatureWriter(client, key_prefix="decision:", ttl_s=30),
            DEFAULT_SYMBOLS,
            interval_s=0.2,
        )
        await keeper.start()

        _say(f"[5/5] decision server on 127.0.0.1:{decision_port}")
        env = {
            **os.environ,
            "DECISION_SERVER__PORT": str(decision_port),
            "DECISION_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
            "DECISION_TORCHSERVE__PRIMARY_ADDRESS": f"127.0.0.1:{primary.grpc_inference}",
            "DECISION_TORCHSERVE__SECONDARY_ADDRESS": f"127.0.0.1:{secondary.grpc_inference}",
        }
        server = ManagedProcess(
            "decision-server",
            [sys.executable, "-m", "server"],
            cwd=REPO,
            log_path=run_dir / "server" / "server.log",
            env=env,
        )
        started.append(server)
        server.start()
        await asyncio.to_thread(server.wait_ready, lambda: _server_serving(decision_port), 30.0)

        _say(_usage(decision_port, 50052 + offset))
        if args.exit_when_ready:
            return 0
        await stop.wait()
        _say("stopping…")
        return 0
    except ProcessStartError as exc:
        _say(f"start failed: {exc}")
        return 1
    finally:
        if keeper is not None:
            await keeper.stop()
        if client is not None:
            await client.aclose()
        for proc in reversed(started):
            await asyncio.to_thread(proc.stop)
        _say("all processes stopped")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=REPO / ".run")
    parser.add_argument(
        "--port-offset", type=int, default=0, help="add N to every port (a second stack)"
    )
    parser.add_argument(
        "--exit-when-ready", action="store_true", help="start, check readiness, stop (a smoke test)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code = asyncio.run(run(args))
    log.info("ran for %.1f s", time.monotonic() - started)
    sys.exit(code)


if __name__ == "__main__":
    main()
