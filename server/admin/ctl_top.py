"""``decisionctl top``: a live view of the fleet, refreshed every second (rich).

Each frame asks one server for the fleet list (``ListServers``: every server process's
counts and breakers) and for its own status (``GetStatus``), and shows rates from the
difference with the frame before: decisions/s by source with p50/p99 (as bucket bounds),
fallbacks/s by reason, a row per server, then that server's replicas, features, audit,
canary and control state, and the consumer's lag and the labeler's AUC from their
/metrics (``render``). The other commands: docs/oncall.md.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as MetricSample
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from core.histogram import quantile_bound
from decision_client.v1 import admin_pb2 as pb
from server.admin.ctl_format import format_loss

MODEL_SOURCES = ("primary", "secondary", "canary")


@dataclass(frozen=True, slots=True)
class Sample:
    """What one frame read, and when."""

    at_s: float
    status: pb.GetStatusResponse
    servers: list[pb.ServerInfo]
    consumer: str = ""  # the feature-cache consumer's lag, as shown
    quality: str = ""  # the labeler's live AUC per model, as shown
    # What this frame could not read, in words ("fleet list: unavailable: ..."); the
    # status shown is then the last one read, and the fleet's rates wait for the list.
    problems: tuple[str, ...] = ()


def scrape(url: str, timeout_s: float = 0.5) -> dict[str, list[MetricSample]]:
    """The samples of a Prometheus /metrics page, by metric name; raises OSError."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http URL given by on-call
        text = response.read().decode()
    found: dict[str, list[MetricSample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def consumer_text(url: str) -> str:
    """The consumer's lag summed over its partitions, or why it is not known."""
    if not url:
        return ""
    try:
        lag = scrape(url).get("feature_cache_consumer_lag", [])
    except (OSError, ValueError) as exc:
        return f"unreachable ({exc})"
    if not lag:
        return "no partitions assigned"
    return f"lag {sum(s.value for s in lag):.0f} events over {len(lag)} partitions"


def quality_text(url: str) -> str:
    """The labeler's live AUC per model and role, with the labelled decisions it is of
    (an AUC of a handful means little), or why it is not known."""
    if not url:
        return ""
    try:
        found = scrape(url)
    except (OSError, ValueError) as exc:
        return f"unreachable ({exc})"

    def key(sample: MetricSample) -> tuple[str, ...]:
        return tuple(sample.labels.get(name, "") for name in ("model", "model_version", "role"))

    samples = {key(s): s.value for s in found.get("decision_quality_samples", [])}
    shown = [
        f"{s.labels['model']} {s.labels['model_version'][:8]} ({s.labels['role']}) {s.value:.3f}"
        f" of {samples.get(key(s), 0):,.0f}"
        for s in sorted(
            found.get("decision_quality_auc", []),
            key=lambda s: (s.labels["role"], s.labels["model"]),
        )
    ]
    return ", ".join(shown) or "no labelled decisions yet"


def local_stack_metrics(admin_address: str) -> tuple[str, str]:
    """The consumer's and the labeler's /metrics when ``admin_address`` is a local stack's
    AdminService on loopback (the stack's layout: 9480 and 9490 plus its port offset)."""
    host, _, port = admin_address.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
        return "", ""
    offset = int(port) - 50052
    return (
        f"http://127.0.0.1:{9480 + offset}/metrics",
        f"http://127.0.0.1:{9490 + offset}/metrics",
    )


def _server_rates(
    server: pb.ServerInfo,
    before: pb.ServerInfo | None,
    counts: Callable[[pb.ServerInfo], Mapping[str, int]],
) -> dict[str, float]:
    """Per-second increase of each of ``counts`` between two entries of one server, over
    the time between its own writes (a restarted server's counts start again from 0)."""
    if before is None or before.started_at != server.started_at:
        return {}
    seconds = (server.seen_at.ToMicroseconds() - before.seen_at.ToMicroseconds()) / 1e6
    if seconds <= 0:
        return {}
    earlier = counts(before)
    return {key: max(0, n - earlier.get(key, 0)) / seconds for key, n in counts(server).items()}


class Baselines:
    """Each server's entry its rates are measured from: the one before its newest. Entries
    are rewritten every second and top reads about as often, so two frames may show the
    same entry: its rates then stay what they were instead of going blank."""

    def __init__(self) -> None:
        self._newest: dict[str, pb.ServerInfo] = {}
        self._before: dict[str, pb.ServerInfo] = {}

    def update(self, servers: list[pb.ServerInfo]) -> dict[str, pb.ServerInfo]:
        """Takes a frame's entries; returns each server's baseline (none on its first)."""
        for server in servers:
            newest = self._newest.get(server.server_id)
            if newest is None or newest.seen_at != server.seen_at:
                if newest is not None:
                    self._before[server.server_id] = newest
                self._newest[server.server_id] = server
        return dict(self._before)


def _fleet_rates(
    sample: Sample,
    baselines: Mapping[str, pb.ServerInfo],
    counts: Callable[[pb.ServerInfo], Mapping[str, int]],
) -> dict[str, float]:
    total: dict[str, float] = {}
    for server in sample.servers:
        for key, rate in _server_rates(server, baselines.get(server.server_id), counts).items():
            total[key] = total.get(key, 0.0) + rate
    return total


def _latency_since(
    sample: Sample, baselines: Mapping[str, pb.ServerInfo]
) -> tuple[tuple[float, ...], dict[str, list[int]]]:
    """The bucket bounds, and per source the answers per bucket since each server's
    baseline, over the fleet."""
    bounds: tuple[float, ...] = ()
    total: dict[str, list[int]] = {}
    for server in sample.servers:
        before = baselines.get(server.server_id)
        if before is None or before.started_at != server.started_at:
            continue
        bounds = tuple(server.latency_bounds_s) or bounds
        for source, now in server.latency.items():
            earlier = before.latency[source].counts if source in before.latency else []
            deltas = [n - (earlier[i] if i < len(earlier) else 0) for i, n in enumerate(now.counts)]
            summed = total.setdefault(source, [0] * len(deltas))
            for i, delta in enumerate(deltas[: len(summed)]):
                summed[i] += max(0, delta)
    return bounds, total


def _ms(bound: float | None) -> str:
    if bound is None:
        return "-"
    return f">{1000 * bound:g}" if bound == float("inf") else f"≤{1000 * bound:g}"


def _heading(text: str) -> Text:
    return Text(f"\n{text}", style="bold")


def render(sample: Sample, baselines: Mapping[str, pb.ServerInfo], address: str) -> RenderableType:
    """One frame: the fleet's rates, then each server, then the asked server's view."""
    by_source = _fleet_rates(sample, baselines, lambda s: s.decisions_by_source)
    fallbacks = _fleet_rates(sample, baselines, lambda s: s.fallbacks)
    total = sum(by_source.values())
    model = sum(rate for source, rate in by_source.items() if source in MODEL_SOURCES)
    header = Text(
        f"decisionctl top  {address}  {time.strftime('%H:%M:%S')}  {len(sample.servers)} servers  ",
        style="bold",
    )
    problems = [Text(f"NOT READ: {problem}", style="bold red") for problem in sample.problems]
    if not sample.servers and sample.problems:
        header.append("(rates when the fleet list reads again)", style="dim")
    elif not baselines:
        header.append("(rates from the next frame)", style="dim")
    else:
        share = f"{model / total:.1%}" if total else "-"
        header.append(f"{total:.0f} decisions/s, model {share}")

    ranked = sorted(by_source, key=lambda source: -by_source[source])
    bounds, latency = _latency_since(sample, baselines)
    sources = Table(box=None)
    sources.add_column("")
    for source in ranked or ["(none yet)"]:
        sources.add_column(source.upper(), justify="right")
    sources.add_row("per s", *(f"{by_source[s]:.1f}" for s in ranked))
    for label, q in (("p50 ms", 0.5), ("p99 ms", 0.99)):
        sources.add_row(
            label, *(_ms(quantile_bound(bounds, latency.get(s, []), q)) for s in ranked)
        )

    reasons = Table(box=None)
    reasons.add_column("REASON")
    reasons.add_column("PER S", justify="right")
    for reason, rate in sorted(fallbacks.items(), key=lambda item: -item[1]):
        if rate > 0:
            reasons.add_row(reason, f"{rate:.1f}")

    servers = Table(box=None)
    for column in ("SERVER", "ADMIN", "SERVING", "DECISIONS/S", "IN FLIGHT", "BREAKERS"):
        servers.add_column(column)
    for server in sample.servers:
        rates = _server_rates(server, baselines.get(server.server_id), lambda s: {"": s.decisions})
        servers.add_row(
            server.server_id,
            server.admin_address,
            "yes" if server.serving else "NO",
            f"{rates['']:.1f}" if rates else "-",
            str(server.in_flight),
            " ".join(f"{n}={state}" for n, state in sorted(server.breakers.items())),
        )

    status = sample.status
    replicas = Table(box=None)
    columns = ("REPLICA", "BREAKER", "OVERRIDE", "CALLS", "FAILED", "FAIL%", "SLOW%", "P50 MS")
    for column in (*columns, "P99 MS"):
        replicas.add_column(column)
    for replica in status.replicas:
        replicas.add_row(
            replica.name,
            replica.breaker_state,
            pb.BreakerMode.Name(replica.mode).removeprefix("BREAKER_MODE_"),
            str(replica.recent_calls),
            str(replica.recent_failures),
            f"{100 * replica.breaker_failure_rate:.0f}",  # what the breaker judges
            f"{100 * replica.breaker_slow_call_rate:.0f}",
            f"{replica.recent_p50_ms:.1f}",
            f"{replica.recent_p99_ms:.1f}",
        )

    features = Table(box=None)
    for feature in status.features:
        features.add_column(feature.symbol, justify="right")
    features.add_row(*("none" if f.age_ms < 0 else f"{f.age_ms:.0f} ms" for f in status.features))

    shadow = _fleet_rates(
        sample, baselines, lambda s: {"scored": s.shadow_scored, "agreed": s.shadow_agreed}
    )
    shadow_text = (
        f"{shadow['agreed'] / shadow['scored']:.0%} agree ({shadow['scored']:.1f}/s)"
        if shadow.get("scored")
        else "none scored"
    )
    audit = status.audit
    drift = status.drift
    worst = max((f.psi for f in drift.features), default=0.0)
    drift_text = f"max PSI {worst:.2f}" if drift.enabled else "off"
    footer = Text(
        f"audit: store {'ok' if audit.store_ok else 'FAILING'}, backlog {audit.backlog_bytes} B"
        f"   canary: weight {status.canary.weight:g}   shadow: {shadow_text}"
        f"   drift: {drift_text}"
        f"   mirror: {'live' if status.feature_mirror.live else 'NOT LIVE'}"
    )
    shared = status.shared_state
    store = "" if shared.durable_ok else ", STORE NOT READ"
    announced = "" if shared.in_sync else ", NOT ANNOUNCED (read each second)"
    control = Text(
        f"control state: version {shared.version}{store}{announced}"
        f"   kill switches: {', '.join(k.scope for k in status.kill_switches) or 'none'}"
    )
    others = [control]
    if shared.losses:
        others.append(Text(format_loss(shared), style="bold red"))
    if sample.consumer:
        others.append(Text(f"feature-cache consumer: {sample.consumer}"))
    if sample.quality:
        others.append(Text(f"live AUC: {sample.quality}"))
    return Group(
        header,
        *problems,
        _heading("decisions/s by source"),
        sources,
        _heading("fallbacks/s by reason"),
        reasons,
        _heading("servers"),
        servers,
        _heading(f"replicas (as {status.server_id} sees them)"),
        replicas,
        _heading("feature age"),
        features,
        Text(""),
        footer,
        *others,
    )


def run(
    read: Callable[[], Sample],
    address: str,
    *,
    interval_s: float,
    frames: int,
    console: Console | None = None,
) -> None:
    """Refreshes every ``interval_s`` until Ctrl-C, or for ``frames`` frames (> 0): in
    place on a terminal, else (piped, to a file) each frame after the last."""
    console = console or Console()
    # Not on a terminal, Live keeps only the last frame: a log of top would lose the rest.
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None
    baselines = Baselines()
    shown = 0
    with live or contextlib.nullcontext():
        while frames <= 0 or shown < frames:
            sample = read()
            frame = render(sample, baselines.update(sample.servers), address)
            if live is None:
                console.print(frame)
            else:
                live.update(frame, refresh=True)
            shown += 1
            if frames <= 0 or shown < frames:
                time.sleep(interval_s)
