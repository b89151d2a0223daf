"""The model replicas as the server calls them: each replica's client (its inference API,
micro-batching), its breaker, and the champion's and the canary's lanes over them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from core.deadline import CallPlan
from core.domain import Source
from server.batching import BatchingClient
from server.control.canary import CanaryMonitor
from server.drift import archived_version
from server.model_client import ModelClient, TorchServeClient
from server.oip import OIP_SERVICE, TORCHSERVE_OIP_SERVICE, OipClient
from server.replica import Replica
from server.router import ReplicaRouter
from server.settings import ARCHIVE_VERSION, InferenceProtocol, Settings
from server.tracing import Tracing
from server.traffic import Traffic

# The OIP's gRPC service, by protocol: TorchServe serves it in a package of its own.
OIP_SERVICES = {"torchserve-oip": TORCHSERVE_OIP_SERVICE, "kserve-v2": OIP_SERVICE}
# The challenger batches in its model server, which can only gather calls that are out
# together; and its shadow calls must not hold the canary's only slot.
CHALLENGER_CONCURRENT_CALLS = 4
# The models by role, as ``torchserve.train`` names their archives and every model
# server registers them.
CHAMPION_MODEL = "champion"
CHALLENGER_MODEL = "challenger"


def model_client(
    name: str,
    address: str,
    model_name: str,
    *,
    protocol: InferenceProtocol,
    model_version: str = "",
    max_concurrent_calls: int,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> ModelClient:
    """The replica's client for its inference API, micro-batching with
    ``max_concurrent_calls`` out at once. ``model_version``: reported for every answer
    instead of the replica's word, when set."""
    client_for_protocol: Callable[..., ModelClient] = (
        TorchServeClient
        if protocol == "torchserve"
        else functools.partial(OipClient, service=OIP_SERVICES[protocol])
    )
    client = client_for_protocol(
        name,
        address,
        model_name,
        model_version=model_version,
        interceptors=interceptors,
    )
    return BatchingClient(client, max_concurrent_calls=max_concurrent_calls)


@dataclass(frozen=True)
class Replicas:
    champions: list[Replica]  # primary, secondary
    challenger: Replica | None
    addresses: dict[str, str]  # by name, for status

    @classmethod
    def build(cls, settings: Settings, tracing: Tracing) -> Replicas:
        ts = settings.torchserve
        interceptors = tracing.client_interceptors()

        def replica(name: str, address: str, source: Source) -> Replica:
            canary = source is Source.CANARY
            model = CHALLENGER_MODEL if canary else CHAMPION_MODEL
            version = ""
            if ts.model_version == ARCHIVE_VERSION:
                version = archived_version(Path(settings.drift.model_store), model)
            client = model_client(
                name,
                address,
                model,
                protocol=ts.protocol_of(challenger=canary),
                model_version=version,
                max_concurrent_calls=(
                    CHALLENGER_CONCURRENT_CALLS if canary else ts.batch_max_concurrent_calls
                ),
                interceptors=interceptors,
            )
            return Replica.build(client, source, settings.breaker, tracing.tracer)

        addresses = {"primary": ts.primary_address, "secondary": ts.secondary_address}
        champions = [
            replica("primary", ts.primary_address, Source.PRIMARY),
            replica("secondary", ts.secondary_address, Source.SECONDARY),
        ]
        for champion in champions:  # rates open one only while the other takes its calls
            champion.breaker.peers = [c.breaker for c in champions if c is not champion]
        challenger = None
        if ts.challenger_address:
            addresses["challenger"] = ts.challenger_address
            challenger = replica("challenger", ts.challenger_address, Source.CANARY)
        return cls(champions, challenger, addresses)

    @property
    def all(self) -> list[Replica]:
        return [*self.champions, *([self.challenger] if self.challenger else [])]


def traffic(plan: CallPlan, replicas: Replicas, canary: CanaryMonitor) -> Traffic:
    """The champion's lane (primary → secondary) and, with a challenger, the canary's."""
    champion = ReplicaRouter(replicas.champions, plan=plan)
    if replicas.challenger is None:
        return Traffic(champion)
    lane = [replicas.challenger, *replicas.champions]
    return Traffic(champion, (ReplicaRouter(lane, plan=plan), canary))
