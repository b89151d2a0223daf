"""The decision service's Python client: the generated messages and stubs
(``decision_client.v1``), the channel options and service config every caller loads,
and blocking and asyncio clients that open a channel the recommended way.

    from decision_client import connect
    from decision_client.v1 import decision_pb2

    with connect("localhost:50051") as client:
        answer = client.decide(
            decision_pb2.DecideRequest(
                request_id="o-1", symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=0.5
            ),
            timeout_s=0.05,
        )
"""

from decision_client.channel import CALLER_OPTIONS, channel_options, service_config
from decision_client.client import (
    AsyncDecisionClient,
    DecisionClient,
    connect,
    connect_async,
)
from decision_client.stream import DecideStreamClient, MessageError

__all__ = [
    "CALLER_OPTIONS",
    "AsyncDecisionClient",
    "DecideStreamClient",
    "DecisionClient",
    "MessageError",
    "channel_options",
    "connect",
    "connect_async",
    "service_config",
]
