"""Calls a decision server with nothing but the decision-client package: a Decide, a
DecideBatch and a DecideStream message, blocking and asyncio, each with the caller's W3C
trace context. Prints one JSON line a call.

    python decide.py --target 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets

from decision_client import connect, connect_async
from decision_client.v1 import decision_pb2 as pb


def order(request_id: str, symbol: str = "BTC-USD") -> pb.DecideRequest:
    return pb.DecideRequest(request_id=request_id, symbol=symbol, side=pb.SIDE_BUY, quantity=1)


def line(call: str, response: pb.DecideResponse, trace_id: str) -> str:
    return json.dumps(
        {
            "call": call,
            "request_id": response.request_id,
            "decision_id": response.decision_id,
            "decision": pb.Decision.Name(response.decision),
            "source": pb.Source.Name(response.source),
            "trace_id": trace_id,
        }
    )


def traceparent() -> tuple[str, str]:
    """A new trace: its id and the ``traceparent`` that carries it."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def blocking(target: str, timeout_s: float) -> None:
    with connect(target) as client:
        client.wait_ready(timeout_s=5)
        trace_id, parent = traceparent()
        response = client.decide(order("b-1"), timeout_s=timeout_s, traceparent=parent)
        print(line("decide", response, trace_id))
        trace_id, parent = traceparent()
        batch = client.decide_batch(
            [order("b-2"), order("b-3", "ETH-USD")], timeout_s=timeout_s, traceparent=parent
        )
        for response in batch:
            print(line("decide_batch", response, trace_id))


async def nonblocking(target: str, timeout_s: float) -> None:
    async with connect_async(target) as client:
        await client.wait_ready(timeout_s=5)
        trace_id, parent = traceparent()
        response = await client.decide(order("a-1"), timeout_s=timeout_s, traceparent=parent)
        print(line("async decide", response, trace_id))
        trace_id, parent = traceparent()
        stream = client.stream(traceparent=parent)
        try:
            response = await stream.decide(order("s-1"), timeout_s)
            print(line("stream decide", response, trace_id))
        finally:
            await stream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--timeout-s", type=float, default=1.0)
    args = parser.parse_args()
    blocking(args.target, args.timeout_s)
    asyncio.run(nonblocking(args.target, args.timeout_s))


if __name__ == "__main__":
    main()
