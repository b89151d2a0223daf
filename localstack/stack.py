"""The local stack as a library: what ``make run``, the soak, the benches and the test
fixtures start, so all of them run the same commands with the same settings.

``LocalStack`` starts the whole stack or the ``parts`` a caller asks for, on one port
offset, and ``stop`` ends whatever ``start`` began; ``decision_server`` is the one place
a decision server process (``python -m server``) gets its settings. See
docs/local-stack.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import random
import secrets
import shutil
import sys
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from core.processes import (
    ManagedProcess,
    ProcessStartError,
    listening,
    niced,
    outgoing_ports,
    port_open,
    start_ready,
    stop_all,
)
from feature_cache.settings import FeatureCacheSettings
from feature_cache.store import FeatureReader
from localstack.chaos import ChaosService, ChaosTarget
from localstack.health import serving
from localstack.kafka_broker import create_topics, kafka_broker
from localstack.port_claims import PortClaims
from localstack.prometheus import Target, prometheus_process, write_config
from localstack.redis_server import redis_server
from server.settings import ARCHIVE_VERSION
from torchserve.archive import ArchiveInfo
from torchserve.models import ensure_models, load_models
from torchserve.replica import (
    CHALLENGER_PORTS,
    PRIMARY_PORTS,
    SECONDARY_PORTS,
    ReplicaPorts,
    start_replica,
    torchserve_replica,
    warm_up_replica,
)
from torchserve.triton import (
    TRITON_ROOT,
    model_ready,
    model_repository,
    tritonserver_process,
)

DEFAULT_SYMBOLS = ["BTC-USD", "ETH-USD", "SOL-USD"]
# CPU priority (nice) of the processes off the Decide path. On two shared cores the
# decision server, the primary and secondary replicas and redis-server must get a core
# the moment a request arrives; the broker and the replayer (other machines in
# production), the challenger (its own deployment) and the consumer (features may be up
# to 500 ms old) yield to them. Without this a TorchServe call took 11-19 ms at p50
# while the stack ran, against ~6 ms alone.
BACKGROUND_NICENESS = 10
TRITON_START_S = 120.0  # a Python backend model loads torch or xgboost: seconds, not ms
MARKET_DATA_PARTITIONS = 4
REPO = Path(__file__).resolve().parents[1]
# The offsets ``free_offset`` draws from (it skips those that meet the default stack).
SECOND_STACK_OFFSETS = range(1000, 15000, 10)


SERVED_MODELS = ("champion", "challenger")
MODEL_SERVERS = ("torchserve", "triton")
# The replicas: name (its ports attribute too), model, CPU priority (the challenger yields).
REPLICA_ROLES = (
    ("primary", "champion", 0),
    ("secondary", "champion", 0),
    ("challenger", "challenger", BACKGROUND_NICENESS),
)
REPLICAS = tuple(name for name, _, _ in REPLICA_ROLES)
# What a stack can start, in the order it starts them.
PARTS = (
    "redis", "broker", *REPLICAS, "feature-cache", "labeler", "replayer", "decision-server",
)  # fmt: skip
# The processes that call the others: stopped before them.
CALLERS = ("feature-cache", "labeler", "replayer", "decision-server")


def served_models(folder: Path) -> dict[str, ArchiveInfo]:
    """The champion's and the challenger's archives as ``folder/models.json`` lists them,
    or a ``ProcessStartError`` saying what is missing."""
    try:
        archives = load_models(folder)
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as exc:
        raise ProcessStartError(
            f"no models in {folder}: {type(exc).__name__} {exc} (--models takes a folder"
            " that make models wrote, as .run/models)"
        ) from exc
    unlisted = [name for name in SERVED_MODELS if name not in archives]
    absent = [str(a.path) for a in archives.values() if not a.path.is_file()]
    problems = [
        *([f"models not listed {unlisted}"] if unlisted else []),
        *([f"archives missing {absent}"] if absent else []),
    ]
    if problems:
        raise ProcessStartError(f"{folder / 'models.json'}: {', '.join(problems)}")
    return archives


def _say(message: str) -> None:
    print(message, flush=True)


def admin_tokens(folder: Path) -> Path:
    """The local stack's admin tokens (made once, owner-only): the server's book (its
    ``DECISION_ADMIN__TOKENS``), and one file per role holding just the token, for
    decisionctl."""
    folder.mkdir(parents=True, exist_ok=True)
    book = folder / "tokens"
    if not book.exists():
        lines = []
        for principal, role in (("oncall", "operator"), ("dashboard", "viewer")):
            token = secrets.token_urlsafe(32)
            lines.append(f"{principal} {role} {token}\n")
            role_file = folder / f"{role}.token"
            role_file.write_text(token + "\n")
            role_file.chmod(0o600)
        book.write_text("".join(lines))
        book.chmod(0o600)
    return book


def decision_server(
    name: str,
    state_dir: Path,
    *,
    port: int,
    redis_url: str,
    primary: str,
    secondary: str,
    challenger: str = "",
    settings: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """A decision server (``python -m server``, not started) on ``port``, the given Redis
    and model replicas (``host:port``; no challenger, no shadow calls), one process. Its
    log, audit journal and SQLite audit store live in ``state_dir``; AdminService takes a
    free port and /metrics is off. ``settings`` (``DECISION_...`` and other environment
    variables) add or override."""
    return ManagedProcess(
        name,
        [sys.executable, "-m", "server"],
        cwd=REPO,
        log_path=state_dir / "server.log",
        env={
            **os.environ,
            "DECISION_SERVER__PORT": str(port),
            "DECISION_REDIS__URL": redis_url,
            "DECISION_TORCHSERVE__PRIMARY_ADDRESS": primary,
            "DECISION_TORCHSERVE__SECONDARY_ADDRESS": secondary,
            "DECISION_TORCHSERVE__CHALLENGER_ADDRESS": challenger,
            "DECISION_ADMIN__PORT": "0",
            "DECISION_SERVER__METRICS_PORT": "0",
            "DECISION_SERVER__WORKERS": "1",
            "DECISION_AUDIT__JOURNAL_DIR": str(state_dir / "journal"),
            "DECISION_AUDIT__DATABASE_URL": f"sqlite:///{state_dir / 'audit.db'}",
            **(settings or {}),
        },
    )


class LocalStack:
    """The local stack's processes and tasks; ``stop`` undoes whatever ``start`` did."""

    def __init__(
        self,
        run_dir: Path,
        offset: int,
        models_dir: Path | None = None,
        *,
        parts: Collection[str] = PARTS,
        workers: int = 1,
        prometheus: bool = False,
        model_server: str = "torchserve",
    ) -> None:
        """``parts``: which of ``PARTS`` to start (a bench's backends, say: redis-server
        and the primary); the others' ports stay closed. ``workers``: decision-server
        processes sharing the ports (their metrics on consecutive ports from the first).
        Without the replayer the caller publishes its own market data (the server starts
        without waiting for features). ``prometheus``: a Prometheus scraping the stack
        with the alert rules loaded. ``model_server``: what serves the models on the
        replicas' ports, ``torchserve`` or ``triton`` (Triton's gRPC, HTTP and metrics on
        TorchServe's gRPC inference, REST inference and metrics ports)."""
        if model_server not in MODEL_SERVERS:
            raise ValueError(f"model server {model_server!r}: one of {MODEL_SERVERS}")
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"parts {sorted(unknown)}: each one of {PARTS}")
        self.parts = frozenset(parts)
        self.model_server = model_server
        # Absolute: the processes run in the checkout, and redis-server and TorchServe
        # read their folders from their own working directory.
        self.run_dir = run_dir.resolve()
        self.models_dir = models_dir.resolve() if models_dir else None
        self.workers = workers
        self.prometheus = prometheus
        self.prometheus_port = 9090 + offset
        self.decision_port = 50051 + offset
        self.admin_port = 50052 + offset
        self.metrics_port = 9464 + offset
        self.consumer_metrics_port = 9480 + offset
        self.labeler_metrics_port = 9490 + offset
        self.redis_port = 16379 + offset
        self.kafka_port = 19092 + offset
        self.primary = PRIMARY_PORTS.shifted(offset)
        self.secondary = SECONDARY_PORTS.shifted(offset)
        self.challenger = CHALLENGER_PORTS.shifted(offset)
        self._claims = PortClaims()
        self._started: list[ManagedProcess] = []
        self._chaos_targets: dict[str, ChaosTarget] = {}
        self._chaos: ChaosService | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def busy_ports(self) -> list[int]:
        return [port for port in self.ports() if port_open("127.0.0.1", port)]

    def claim_ports(self) -> str:
        """Claims this stack's ports for this process until ``stop`` and returns '', or
        claims none and returns why: ports another stack claims (starting or running) or
        some process listens on."""
        taken = self._claims.claim(self.ports())
        if taken:
            shown = ", ".join(f"{port} ({who})" for port, who in list(taken.items())[:5])
            return f"ports another stack claims: {shown}"
        busy = self.busy_ports()
        if busy:
            self._claims.release()
            return f"ports already in use: {', '.join(map(str, busy[:5]))}"
        return ""

    def overlap_with_default(self) -> list[int]:
        """The ports this stack shares with a stack on the default ports (offset 0)."""
        if self.decision_port == LocalStack(self.run_dir, 0).decision_port:
            return []
        return sorted(set(self.ports()) & set(LocalStack(self.run_dir, 0).ports()))

    @classmethod
    def free_offset(cls, run_dir: Path, **options: Any) -> int:
        """A random port offset (1000 to 15000) whose stack would take no port in use now,
        none that another stack claims (``localstack.port_claims``: a stack claims its
        ports as it starts, before it binds them) and none of the default stack's: for a
        second stack beside ``make run``'s. Two draws within the moment before either
        stack claims (a second or two when the stack is a child process) may still meet.

        Offsets whose ports all lie outside the kernel's range for outgoing connections
        come first: a port in that range can be taken, between this check and the
        listener's bind, as the local end of some process's connection."""
        rng = random.Random()  # noqa: S311 - spreading ports, not a secret
        offsets = list(SECOND_STACK_OFFSETS)
        rng.shuffle(offsets)
        outgoing = outgoing_ports()
        stacks = [cls(run_dir, offset, **options) for offset in offsets]
        stacks.sort(key=lambda stack: any(port in outgoing for port in stack.ports()))
        candidates = (stack for stack in stacks if not stack.overlap_with_default())
        claims = PortClaims()
        for stack in itertools.islice(candidates, 100):
            if not claims.claimed_elsewhere(stack.ports()) and not stack.busy_ports():
                return stack.decision_port - cls(run_dir, 0).decision_port
        raise ProcessStartError("no free port offset for another stack")

    def ports(self) -> list[int]:
        """Every port this stack's parts listen on."""
        server = [
            self.decision_port,
            self.admin_port,
            *range(self.metrics_port, self.metrics_port + self.workers),
        ]
        ports = {
            "redis": [self.redis_port],
            "broker": [self.kafka_port],
            "feature-cache": [self.consumer_metrics_port],
            "labeler": [self.labeler_metrics_port],
            "decision-server": server,
            **{name: list(asdict(getattr(self, name)).values()) for name in REPLICAS},
        }
        return [
            *(port for part in PARTS for port in ports.get(part, ()) if part in self.parts),
            *([self.prometheus_port] if self.prometheus else []),
        ]

    @property
    def processes(self) -> dict[str, ManagedProcess]:
        """The processes started so far, by name (redis-server, the broker, torchserve-primary,
        ..., feature-cache, replayer, decision-server, labeler)."""
        return {proc.name: proc for proc in self._started}

    def _track(self, proc: ManagedProcess) -> ManagedProcess:
        self._started.append(proc)  # before it starts, so an interrupted start stops it
        proc.start()
        return proc

    def _env(self) -> dict[str, str]:
        """The settings every process of the stack shares."""
        return {
            **os.environ,
            "DECISION_REDIS__URL": self.redis_url,
            "DECISION_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{self.kafka_port}",
        }

    def _python(
        self, name: str, *args: str, env: dict[str, str] | None = None, niceness: int = 0
    ) -> ManagedProcess:
        return ManagedProcess(
            name,
            niced([sys.executable, *args], niceness),
            cwd=REPO,
            log_path=self.run_dir / name / f"{name}.log",
            env={**self._env(), **(env or {})},
        )

    async def start(self) -> None:
        """Starts the stack's parts in order, each ready before the next."""
        if not self._claims.held:  # callers that report a refusal their own way claim first
            refused = self.claim_ports()
            if refused:
                raise ProcessStartError(f"{refused} (--port-offset N moves this stack)")
        parts = self.parts
        archives: dict[str, ArchiveInfo] = {}
        if parts & {*REPLICAS, "decision-server"}:
            if self.models_dir is None:
                _say("[1/8] models: .run/models (trained now if missing or stale)")
                archives = await asyncio.to_thread(ensure_models, REPO / ".run/models")
            else:
                _say(f"[1/8] models: {self.models_dir}")
                archives = served_models(self.models_dir)
            for name, archive in archives.items():
                _say(f"      {name} version {archive.version[:16]}…")

        if "redis" in parts:
            _say(f"[2/8] redis-server on 127.0.0.1:{self.redis_port}")
            redis = self._track(redis_server(self.redis_port, self.run_dir / "redis"))
            await asyncio.to_thread(redis.wait_ready, listening(self.redis_port), 10.0)
            self._chaos_targets["redis"] = ChaosTarget(
                redis,
                f"127.0.0.1:{self.redis_port}",
                lambda: start_ready(redis, listening(self.redis_port), 10.0),
            )
        if "broker" in parts:
            await self._start_broker()
        if parts & set(REPLICAS):
            if self.model_server == "triton":
                await self._start_triton(archives)
            else:
                await self._start_torchserve(archives["champion"].path.parent)
        if "feature-cache" in parts:
            _say("[5/8] feature-cache consumer")
            self._track(
                self._python(
                    "feature-cache",
                    "-m",
                    "feature_cache",
                    env={"DECISION_FEATURE_CACHE__METRICS_PORT": str(self.consumer_metrics_port)},
                    niceness=BACKGROUND_NICENESS,
                )
            )
        if "labeler" in parts:
            # Before the server, so that its market data covers the first decision; it
            # waits for the audit store's schema, which the server migrates as it starts.
            _say("[6/8] labeler: decisions' realized outcomes, the models' live quality")
            self._track(
                self._python(
                    "labeler",
                    "-m",
                    "quality",
                    env={
                        "DECISION_AUDIT__DATABASE_URL": self.audit_database_url,
                        "DECISION_QUALITY__METRICS_PORT": str(self.labeler_metrics_port),
                    },
                    niceness=BACKGROUND_NICENESS,
                )
            )
        if "replayer" in parts:
            _say("[7/8] replayer: generated market data for " + ", ".join(DEFAULT_SYMBOLS))
            self._track(
                self._python(
                    "replayer", "-m", "feature_cache.replay", "--count", "0", "--speed", "1",
                    "--events-per-second", "300", "--symbols", ",".join(DEFAULT_SYMBOLS),
                    niceness=BACKGROUND_NICENESS,
                )
            )  # fmt: skip
            await self._wait_for_features(timeout_s=60.0)
        elif "feature-cache" in parts:
            _say("[7/8] replayer: none (the caller publishes the market data)")
        if "decision-server" in parts:
            await self._start_server(archives["champion"].path.parent)
        if self.prometheus:
            await self._start_prometheus()
        if "decision-server" in parts:  # the chaos service acts on a running stack
            self._chaos = ChaosService(self.run_dir, self._chaos_targets)
            await self._chaos.start()

    @property
    def audit_database_url(self) -> str:
        return f"sqlite:///{self.run_dir / 'audit' / 'audit.db'}"

    def decision_server(
        self, name: str, port: int, state_dir: Path, settings: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """A decision server (not started) on this stack's Redis and replicas, on
        ``port``; see ``decision_server``."""
        return decision_server(
            name,
            state_dir,
            port=port,
            redis_url=self.redis_url,
            primary=f"127.0.0.1:{self.primary.grpc_inference}",
            secondary=f"127.0.0.1:{self.secondary.grpc_inference}",
            challenger=(
                f"127.0.0.1:{self.challenger.grpc_inference}" if "challenger" in self.parts else ""
            ),
            settings={
                "DECISION_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{self.kafka_port}",
                **self._model_server_env(),
                **(settings or {}),
            },
        )

    async def _start_broker(self) -> None:
        kafka = FeatureCacheSettings().kafka
        _say(f"[3/8] Kafka-protocol broker on 127.0.0.1:{self.kafka_port}, topic {kafka.topic}")
        broker = self._track(
            kafka_broker(self.kafka_port, self.run_dir / "kafka", niceness=BACKGROUND_NICENESS)
        )
        await asyncio.to_thread(broker.wait_ready, listening(self.kafka_port), 20.0)
        self._chaos_targets["broker"] = ChaosTarget(
            broker,
            f"127.0.0.1:{self.kafka_port}",
            lambda: start_ready(broker, listening(self.kafka_port), 20.0),
        )
        await create_topics(
            f"127.0.0.1:{self.kafka_port}",
            {kafka.topic: MARKET_DATA_PARTITIONS, kafka.dead_letter_topic: 1},
        )

    async def _start_server(self, store: Path) -> None:
        workers = f", {self.workers} workers" if self.workers > 1 else ""
        _say(f"[8/8] decision server on 127.0.0.1:{self.decision_port}{workers}")
        server = self._track(
            self.decision_server(
                "decision-server",
                self.decision_port,
                self.run_dir / "decision-server",
                {
                    "DECISION_ADMIN__PORT": str(self.admin_port),
                    "DECISION_ADMIN__TOKENS": admin_tokens(self.run_dir / "admin").read_text(),
                    "DECISION_SERVER__METRICS_PORT": str(self.metrics_port),
                    "DECISION_SERVER__WORKERS": str(self.workers),
                    "DECISION_AUDIT__JOURNAL_DIR": str(self.run_dir / "audit" / "journal"),
                    "DECISION_AUDIT__DATABASE_URL": self.audit_database_url,
                    # Drift against the served archives' training references.
                    "DECISION_DRIFT__MODEL_STORE": str(store),
                    # Triton answers version "1": the archives' own versions are reported,
                    # read from the same folder.
                    **(
                        {"DECISION_TORCHSERVE__MODEL_VERSION": ARCHIVE_VERSION}
                        if self.model_server == "triton"
                        else {}
                    ),
                },
            )
        )
        await asyncio.to_thread(server.wait_ready, lambda: serving(self.decision_port), 30.0)

    async def _start_torchserve(self, store: Path) -> None:
        roles = [role for role in REPLICA_ROLES if role[0] in self.parts]
        _say("[4/8] TorchServe " + ", ".join(
            f"{name} :{getattr(self, name).grpc_inference}" for name, _, _ in roles
        ))  # fmt: skip
        replicas = [
            (
                self._track(
                    torchserve_replica(
                        name, getattr(self, name), store, self.run_dir, niceness=niceness
                    )
                ),
                getattr(self, name),
                model,
            )
            for name, model, niceness in roles
        ]  # the JVMs boot in parallel
        for proc, ports, model in replicas:
            await asyncio.to_thread(start_replica, proc, ports, model_name=model)
            self._chaos_targets[proc.name.removeprefix("torchserve-")] = ChaosTarget(
                proc,
                f"127.0.0.1:{ports.grpc_inference}",
                functools.partial(start_replica, proc, ports, model_name=model),
            )
        # Side by side: each JVM compiles its own hot paths. The challenger is off the
        # answer path: it warms up on shadow calls.
        warming = [name for name, _, _ in roles if name != "challenger"]
        warmed = await asyncio.gather(*(
            asyncio.to_thread(warm_up_replica, f"127.0.0.1:{getattr(self, name).grpc_inference}")
            for name in warming
        ))  # fmt: skip
        for name, warm in zip(warming, warmed, strict=True):
            if warm.problem:
                _say(f"      {name} warm-up stopped after {warm.calls} calls ({warm.problem})")
            else:
                _say(f"      {name} warmed up with {warm.calls} calls")

    async def _start_triton(self, archives: dict[str, ArchiveInfo]) -> None:
        """One tritonserver per replica, each serving its model from a repository made of
        the archive (``torchserve.triton``)."""
        if not (TRITON_ROOT / "bin" / "tritonserver").exists():
            raise ProcessStartError(
                f"no tritonserver in {TRITON_ROOT}: `make run MODEL_SERVER=triton` installs it"
            )
        _say("[4/8] Triton " + ", ".join(
            f"{name} :{getattr(self, name).grpc_inference}"
            for name in REPLICAS if name in self.parts
        ))  # fmt: skip
        started = []
        for name, model, niceness in REPLICA_ROLES:
            if name not in self.parts:
                continue
            ports: ReplicaPorts = getattr(self, name)
            folder = self.run_dir / f"triton-{name}"
            repository = folder / "models"
            shutil.rmtree(repository, ignore_errors=True)  # the archives may have changed
            model_repository(archives[model].path, repository, model_name=model)
            proc = self._track(
                tritonserver_process(
                    TRITON_ROOT,
                    repository,
                    grpc_port=ports.grpc_inference,
                    http_port=ports.rest_inference,
                    metrics_port=ports.rest_metrics,
                    log_path=folder / "triton.log",
                    niceness=niceness,
                    name=f"triton-{name}",
                )
            )
            address = f"127.0.0.1:{ports.grpc_inference}"
            ready = functools.partial(model_ready, address, model)
            started.append((name, proc, ready))
            self._chaos_targets[name] = ChaosTarget(
                proc, address, functools.partial(start_ready, proc, ready, TRITON_START_S)
            )
        for _, proc, ready in started:  # the servers load their models in parallel
            await asyncio.to_thread(proc.wait_ready, ready, TRITON_START_S)

    def _model_server_env(self) -> dict[str, str]:
        """A decision server's settings for the model server: TorchServe's are the
        defaults; Triton speaks OIP."""
        if self.model_server != "triton":
            return {}
        return {"DECISION_TORCHSERVE__PROTOCOL": "kserve-v2"}

    def scrape_targets(self) -> list[Target]:
        """Every /metrics of the stack, by job."""
        return [
            Target(
                "decision-server", tuple(range(self.metrics_port, self.metrics_port + self.workers))
            ),
            Target("feature-cache", (self.consumer_metrics_port,)),
            Target("labeler", (self.labeler_metrics_port,)),
            Target(
                self.model_server,
                tuple(r.rest_metrics for r in (self.primary, self.secondary, self.challenger)),
            ),
        ]

    async def _start_prometheus(self) -> None:
        folder = self.run_dir / "prometheus"
        config_file = write_config(folder, self.scrape_targets())
        _say(
            f"      prometheus on 127.0.0.1:{self.prometheus_port}, the alert rules of"
            " k8s/base/alert-rules.yaml loaded"
        )
        proc = self._track(prometheus_process(folder, config_file, self.prometheus_port))
        await asyncio.to_thread(proc.wait_ready, listening(self.prometheus_port), 30.0)

    async def _wait_for_features(self, timeout_s: float) -> None:
        """Until the consumer has written every default symbol's features to Redis."""
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{self.redis_port}/0")
        reader = FeatureReader(client, key_prefix=FeatureCacheSettings().redis.key_prefix)
        deadline = time.monotonic() + timeout_s
        try:
            while None in await reader.read_many(DEFAULT_SYMBOLS):
                if time.monotonic() > deadline:
                    raise ProcessStartError(f"no features in Redis after {timeout_s:.0f} s")
                await asyncio.sleep(0.2)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._chaos is not None:  # first: no fault starts while the stack stops
            await self._chaos.stop()
        # The callers first, side by side (what they drain to may need the others), then
        # the others side by side: each stop is mostly a wait for the process's own drain.
        callers = [proc for proc in self._started if proc.name in CALLERS]
        others = [proc for proc in self._started if proc.name not in CALLERS]
        for procs in (callers, others):
            await asyncio.to_thread(stop_all, procs)
        self._claims.release()
        _say("all processes stopped")


@contextlib.contextmanager
def started(run_dir: Path, parts: Collection[str], **options: Any) -> Iterator[LocalStack]:
    """A stack of ``parts`` on a free port offset (clear of ``make run``'s), started on
    entry and stopped on exit, for synchronous callers (the benches)."""
    offset = LocalStack.free_offset(run_dir, parts=parts, **options)
    stack = LocalStack(run_dir, offset, parts=parts, **options)
    try:
        asyncio.run(stack.start())
        yield stack
    finally:
        asyncio.run(stack.stop())
