"""``make run``: the local stack (``localstack.stack.LocalStack``) on the README's ports,
until Ctrl-C or SIGTERM stops every process, each through its own process group, in
reverse order. Prints how to call it once the server reports SERVING. Run-time files go
under ``.run/``; the models are ``make models``'s in ``.run/models`` (trained first when
missing or stale, about a minute), or those in ``--models DIR`` as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from core.processes import ProcessStartError
from core.tasks import cancel_and_wait
from feature_cache.settings import FeatureCacheSettings
from localstack.prometheus import prometheus_binary
from localstack.stack import MODEL_SERVERS, REPO, LocalStack

log = logging.getLogger("localstack")


def _say(message: str) -> None:
    print(message, flush=True)


def _usage(stack: LocalStack) -> str:
    decision_port, admin_port, run_dir = stack.decision_port, stack.admin_port, stack.run_dir
    last = stack.metrics_port + stack.workers - 1
    workers = f"; its workers on the ports up to {last}" if stack.workers > 1 else ""
    prometheus = (
        f"  Prometheus: http://127.0.0.1:{stack.prometheus_port}/classic/alerts"
        " (the stack's alerts)\n"
        if stack.prometheus
        else ""
    )
    # Named in the command: the replayer's default is the default stack's broker.
    broker, topic = f"127.0.0.1:{stack.kafka_port}", FeatureCacheSettings().kafka.topic
    return f"""
Decision service ready on 127.0.0.1:{decision_port}  (Ctrl-C stops everything)

  Python:
    import grpc
    from decision_client.v1 import decision_pb2 as pb, decision_pb2_grpc as rpc
    # Past the server's per-connection cap: RESOURCE_EXHAUSTED at once, not a queue.
    options = [("grpc.http.max_concurrent_streams_reject_on_client", 1),
               ("grpc.enable_retries", 0)]
    channel = grpc.insecure_channel("127.0.0.1:{decision_port}", options=options)
    stub = rpc.DecisionServiceStub(channel)
    print(stub.Decide(pb.DecideRequest(symbol="BTC-USD", side=pb.SIDE_BUY, quantity=1),
                      timeout=0.05))

  grpcurl (uses server reflection):
    grpcurl -plaintext -max-time 0.05 \\
      -d '{{"symbol":"BTC-USD","side":"SIDE_BUY","quantity":1}}' \\
      127.0.0.1:{decision_port} decision.v1.DecisionService/Decide

  On-call (AdminService on 127.0.0.1:{admin_port}; tokens in {run_dir}/admin/):
    export DECISIONCTL_ADDRESS=127.0.0.1:{admin_port}
    export DECISIONCTL_TOKEN_FILE={run_dir}/admin/operator.token
    .venv/bin/decisionctl status
    .venv/bin/decisionctl flag set shadow_sample_rate 0.1 --reason "compare the challenger"

  Market data: broker {broker} (topic {topic}); to replay a recording:
    .venv/bin/python -m feature_cache.replay --bootstrap {broker} --source KIND:PATH --speed 1

  Metrics: http://127.0.0.1:{stack.metrics_port}/metrics (server{workers})
           http://127.0.0.1:{stack.consumer_metrics_port}/metrics (feature-cache consumer)
           http://127.0.0.1:{stack.labeler_metrics_port}/metrics (labeler: live model quality)
{prometheus}  Audit:   {run_dir}/audit/audit.db (SQLite); replay with .venv/bin/decisionctl replay
  Logs: {run_dir}/*/
"""


async def run(args: argparse.Namespace) -> int:
    if args.with_prometheus:
        prometheus_binary()  # before anything starts: say what is missing
    stack = LocalStack(
        args.run_dir,
        args.port_offset,
        args.models,
        workers=args.workers,
        prometheus=args.with_prometheus,
        model_server=args.model_server,
    )
    overlap = stack.overlap_with_default()
    if overlap:
        _say(
            f"--port-offset {args.port_offset} puts this stack on ports a stack on the default "
            f"ports uses ({', '.join(map(str, overlap[:5]))}): use a multiple of 1000"
        )
        return 2
    refused = stack.claim_ports()
    if refused:
        _say(f"{refused}; is another stack running? (--port-offset N moves this one)")
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    starting = asyncio.create_task(stack.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C while starting: stop what has started
            _say("interrupted while starting; stopping…")
            await cancel_and_wait(starting)
            return 0
        starting.result()
        _say(_usage(stack))
        if not args.exit_when_ready:
            await stopping
            _say("stopping…")
        return 0
    except ProcessStartError as exc:
        _say(f"start failed: {exc}")
        return 1
    finally:
        stopping.cancel()
        await stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m localstack",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=REPO / ".run",
        help="run-time files: logs, data, the admin tokens, chaos.sock (default: .run/)",
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add N to every port (a second stack; a multiple of 1000 keeps clear of the "
        "first, and 11000-13000 of the ports Linux gives outgoing connections too)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        help="serve the archives in this folder as they are (default: .run/models, trained)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decision-server processes sharing its ports (default 1: on two cores the "
        "three TorchServe replicas need the other one)",
    )
    parser.add_argument(
        "--with-prometheus",
        action="store_true",
        help="also run a Prometheus (port 9090 + offset) scraping the stack, with the alert "
        "rules of k8s/base loaded",
    )
    parser.add_argument(
        "--model-server",
        choices=MODEL_SERVERS,
        default="torchserve",
        help="what serves the models on the replicas' ports (default torchserve)",
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
