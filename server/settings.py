"""One settings tree for the decision server, read from ``DECISION_*`` environment variables.

Nested fields use ``__``: ``DECISION_DEADLINE__MODEL_CALL_MS=15``,
``DECISION_REDIS__URL=redis://127.0.0.1:6379/0``. Units are in the field names. The
server's own sections are here; the feature cache's and the ladder's come from their
packages (``feature_cache.settings``, ``fallback.settings``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, SecretStr, model_validator
from pydantic_settings import BaseSettings

from core.deadline import (
    DEFAULT_BUDGET_MS,
    FALLBACK_RESERVE_MS,
    MIN_COUNTED_TIMEOUT_MS,
    MODEL_CALL_MS,
    RESPONSE_MARGIN_MS,
    STORE_READ_MS,
    CallPlan,
)
from core.domain import DEFAULT_TRADE_THRESHOLD
from core.settings import ROOT_CONFIG, SettingsSection, TelemetrySettings
from fallback.settings import FallbackSettings
from feature_cache.settings import FeatureSettings, RedisSettings
from server.audit.settings import AuditSettings
from server.breaker import RateRule


class ServerSettings(SettingsSection):
    host: str = Field("127.0.0.1", description="Address DecisionService listens on.")
    port: int = Field(
        50051,
        ge=0,
        le=65535,
        description="DecisionService gRPC port (health and reflection too).",
    )
    grace_period_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, how long in-flight RPCs may finish before being cancelled.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Server processes sharing the ports (SO_REUSEPORT), each with its own "
        "journal folder and metrics port; 0: one per core this process may use. "
        "`decision-server --workers N` overrides it.",
    )
    metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="Prometheus /metrics port (HTTP), the first of one per worker; 0: off.",
    )
    max_connection_age_s: float = Field(
        0.0,
        ge=0,
        description="Connections older than this are closed gracefully (GOAWAY; calls in "
        "flight get 10 s to finish), so that clients reconnect and "
        "re-resolve: behind a headless Service, new pods join their round robin only "
        "then. 0: connections last as long as clients keep them.",
    )
    max_concurrent_streams: int = Field(
        16,
        ge=1,
        description="Calls one client connection may have in flight; gRPC's core refuses one past "
        "it before Python sees it. Size it so that connections x this is what the "
        "server answers within a deadline (docs/overload.md).",
    )
    caller_share: int = Field(
        16,
        ge=0,
        description="Calls one caller may have in flight in this server process (a "
        "DecideStream's unanswered messages count as calls): one past it is refused at once "
        "(RESOURCE_EXHAUSTED with RetryInfo), counted apart. A caller is its client "
        "certificate's identity under mTLS, else the client_id it writes from its host "
        "(advisory); calls with neither have no share. 0: no limit.",
    )
    caller_shares: dict[str, NonNegativeInt] = Field(
        default_factory=dict,
        description='caller_share for named callers, as JSON: {"spiffe://trading/desk-7": 24}.',
    )
    tls_cert_file: str = Field(
        "",
        description="PEM certificate chain of both ports (DecisionService and AdminService); "
        "empty: plaintext. Needs tls_key_file.",
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str = Field(
        "",
        description="PEM CA bundle: when set (with TLS), DecisionService callers must present "
        "a certificate it signed (mTLS); its first subject alternative name (else its common "
        "name) is the caller's identity in the audit record and metrics. Reloaded when the "
        "file changes, as the certificate and key.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(
                "server.tls_client_ca_file (mTLS) needs server.tls_cert_file and tls_key_file"
            )
        return self


class AdminSettings(SettingsSection):
    host: str = Field(
        "127.0.0.1",
        description="Address AdminService listens on: an interface the network can restrict.",
    )
    port: int = Field(
        50052,
        ge=0,
        le=65535,
        description="AdminService gRPC port, apart so the network can restrict it.",
    )
    tokens: SecretStr = Field(
        SecretStr(""),
        description="Bearer tokens, '<principal> <role> <token>' (role viewer or operator), "
        "separated by newlines or commas; never logged.",
    )
    tls_client_ca_file: str = Field(
        "",
        description="PEM CA bundle: when set (with server TLS), admin clients must present "
        "a certificate it signed (mTLS).",
    )
    advertise_address: str = Field(
        "",
        description="host:port other machines reach this AdminService at, as registered in "
        "the fleet list (decisionctl status, top); empty: the listening address, with this "
        "host's name for a wildcard host (Kubernetes: the pod IP and the port).",
    )


ARCHIVE_VERSION = "archive"
"""A model_version that names the served archive's own version hash (resolved where
server.replicas builds the replicas, from drift.model_store)."""

InferenceProtocol = Literal["torchserve", "torchserve-oip", "kserve-v2"]


class TorchServeSettings(SettingsSection):
    protocol: InferenceProtocol = Field(
        "torchserve",
        description="Inference API of the replicas: torchserve (TorchServe's native gRPC "
        "API), torchserve-oip (the Open Inference Protocol as TorchServe serves it) or "
        "kserve-v2 (the same protocol under its standard service: Triton, KServe, "
        "MLServer).",
    )
    model_version: Literal["", "archive"] = Field(
        "",
        description="Empty: each answer carries the version its replica says. archive: the "
        "version of champion.mar or challenger.mar in drift.model_store, for servers that answer a "
        "number (Triton's '1').",
    )
    primary_address: str = Field(
        "127.0.0.1:7070", description="host:port of the primary replica's gRPC inference API."
    )
    primary_is_sidecar: bool = Field(
        False,
        description="The primary is this server's own sidecar (a container in its pod): the "
        "server is not ready before the primary accepts a connection, and DecisionService's "
        "health, the readiness probe's, says NOT_SERVING while the primary refuses them, so a "
        "pod whose sidecar has stopped leaves the Service, also where native sidecars do not "
        "exist (podman kube play). A replica restarting a worker keeps its port and the pod.",
    )
    secondary_address: str = Field(
        "127.0.0.1:7170", description="host:port of the replica that gets the single retry."
    )
    challenger_address: str = Field(
        "127.0.0.1:7270",
        description="host:port of the challenger replica (shadow and canary); empty: none.",
    )
    challenger_protocol: Literal["", "torchserve", "torchserve-oip", "kserve-v2"] = Field(
        "", description="The challenger's inference API when it differs; empty: protocol."
    )
    batch_max_concurrent_calls: int = Field(
        1,
        ge=1,
        description="Model calls out to one replica at once; requests past it go together in the "
        "next. Match the replica's model-server workers (docs/capacity.md).",
    )

    def protocol_of(self, *, challenger: bool) -> InferenceProtocol:
        return (self.challenger_protocol or self.protocol) if challenger else self.protocol


class BreakerSettings(SettingsSection):
    fail_max: int = Field(
        5,
        ge=1,
        description="Consecutive failures that open a replica's breaker; calls in flight "
        "together that fail together count once.",
    )
    reset_timeout_s: float = Field(
        2.0,
        gt=0,
        description="How long an open breaker waits before it lets trial calls through "
        "(one, then twice as many after each success).",
    )
    window_s: int = Field(
        RateRule.window_s,
        ge=1,
        le=300,
        description="The sliding window, in seconds, over which a closed breaker judges "
        "its replica's failure and slow-call rates.",
    )
    min_calls: int = Field(
        RateRule.min_calls,
        ge=1,
        description="Calls in the window before the rates can open the breaker.",
    )
    failure_rate: float = Field(
        RateRule.failure_rate,
        gt=0,
        le=1,
        description="Share of the window's calls that failed (error, timeout, refusal by "
        "the replica) at which the breaker opens.",
    )
    slow_call_rate: float = Field(
        RateRule.slow_rate,
        gt=0,
        le=1,
        description="Share of the window's calls that took slow_call_ms or longer, failed "
        "or not, at which the breaker opens (1: only when every call is slow; a busy "
        "decision server makes every replica look slow).",
    )
    slow_call_ms: float = Field(
        RateRule.slow_ms,
        gt=0,
        description="A model call this long or longer is slow; keep it below "
        "deadlines.model_call_ms, the cap on one call.",
    )

    def rule(self) -> RateRule:
        return RateRule(
            self.window_s, self.min_calls, self.failure_rate, self.slow_call_rate,
            self.slow_call_ms,
        )  # fmt: skip


class DeadlineSettings(SettingsSection):
    default_budget_ms: float = Field(
        DEFAULT_BUDGET_MS,
        gt=FALLBACK_RESERVE_MS,
        description="Budget of a call that arrives without a gRPC deadline.",
    )
    response_margin_ms: float = Field(
        RESPONSE_MARGIN_MS,
        ge=0,
        description="The server plans to answer this long before the caller's deadline: the "
        "answer's way back and a stall of the machine on the last step "
        "(docs/overload.md).",
    )
    model_call_ms: float = Field(
        MODEL_CALL_MS,
        gt=0,
        description="Cap on one model call, before jitter; the budget left may cut it.",
    )
    store_read_ms: float = Field(
        STORE_READ_MS,
        gt=0,
        description="Cap on one Redis read on the decision path (features, cached score): "
        "past it Redis is sick, and the rest of the budget stays for the ladder.",
    )

    def plan(self) -> CallPlan:
        return CallPlan(
            default_budget_ms=self.default_budget_ms,
            response_margin_ms=self.response_margin_ms,
            model_call_ms=self.model_call_ms,
            store_read_ms=self.store_read_ms,
            fallback_reserve_ms=FALLBACK_RESERVE_MS,
        )


class DecisionSettings(SettingsSection):
    threshold: float = Field(
        DEFAULT_TRADE_THRESHOLD, ge=0.0, le=1.0, description="TRADE when score >= threshold."
    )


class CanarySettings(SettingsSection):
    """Limits of the canary against the champion; a breach rolls the canary back."""

    max_error_rate_increase: float = Field(
        0.05, ge=0, description="Canary model-call error/timeout rate above the champion's."
    )
    max_p99_ratio: float = Field(
        2.0,
        gt=0,
        description="Canary p99 latency limit as a multiple of the champion's (plus 5 ms).",
    )
    max_fallback_rate_increase: float = Field(
        0.05,
        ge=0,
        description="Share of decisions ending in the fallback ladder, above the champion's.",
    )


class DriftSettings(SettingsSection):
    model_store: str = Field(
        "",
        description="Folder of model archives (.mar): live features and champion scores "
        "are compared with the reference.json of the archive of the version the champion "
        "answers with; empty: no drift is computed.",
    )


class Settings(BaseSettings):
    model_config = ROOT_CONFIG

    server: ServerSettings = ServerSettings()
    torchserve: TorchServeSettings = TorchServeSettings()
    breaker: BreakerSettings = BreakerSettings()
    redis: RedisSettings = RedisSettings()
    features: FeatureSettings = FeatureSettings()
    deadline: DeadlineSettings = DeadlineSettings()
    decision: DecisionSettings = DecisionSettings()
    fallback: FallbackSettings = FallbackSettings()
    audit: AuditSettings = AuditSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    admin: AdminSettings = AdminSettings()
    canary: CanarySettings = CanarySettings()
    drift: DriftSettings = DriftSettings()

    @model_validator(mode="after")
    def _mtls_needs_tls(self) -> Settings:
        if self.admin.tls_client_ca_file and not self.server.tls_cert_file:
            raise ValueError(
                "admin.tls_client_ca_file (mTLS) needs server.tls_cert_file and tls_key_file"
            )
        return self

    @model_validator(mode="after")
    def _archive_versions_need_the_archives(self) -> Settings:
        if self.torchserve.model_version == ARCHIVE_VERSION and not self.drift.model_store:
            raise ValueError(
                f"torchserve.model_version '{ARCHIVE_VERSION}' reads the archives in "
                "drift.model_store, which is not set"
            )
        return self

    @model_validator(mode="after")
    def _breaker_can_count_timeouts(self) -> Settings:
        shortest_cap_ms = self.deadline.plan().shortest_model_call_ms
        if MIN_COUNTED_TIMEOUT_MS > shortest_cap_ms:
            raise ValueError(
                f"deadline.model_call_ms ({self.deadline.model_call_ms}) leaves calls of"
                f" {shortest_cap_ms:.1f} ms after jitter, shorter than the"
                f" {MIN_COUNTED_TIMEOUT_MS:.0f} ms a timeout must last to count against a"
                " replica: a hung replica would never open its breaker"
            )
        return self
