"""``decisionctl``'s output: AdminService's answers as the tables and lines on-call reads
(pure: messages in, text out)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from decision_client.v1 import admin_pb2 as pb

MODEL_VERSION_SHOWN = 12


def _time(ts: Timestamp) -> str:
    return ts.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mode(mode: pb.BreakerMode.ValueType) -> str:
    return pb.BreakerMode.Name(mode).removeprefix("BREAKER_MODE_")


def _num(value: float) -> str:
    return f"{value:g}"


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def shown(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``): a reason
    stored before the server refused them cannot forge a line or a colour here."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def format_change(change: pb.ChangeInfo) -> str:
    """``by alice at ..., until ...: reason`` (parts that are unset are left out)."""
    text = f"by {shown(change.changed_by) or '?'}"
    if change.HasField("changed_at"):
        text += f" at {_time(change.changed_at)}"
    if change.HasField("expires_at"):
        text += f", until {_time(change.expires_at)}"
    return f"{text}: {shown(change.reason)}" if change.reason else text


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "  ") -> str:
    """Left-aligned columns separated by two spaces; a header line, then one per row."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))).rstrip()
        for line in lines
    )


def format_flags(flags: Iterable[pb.Flag]) -> str:
    rows = [
        [
            flag.name,
            flag.value,
            flag.default_value,
            format_change(flag.change) if flag.HasField("change") else "",
        ]
        for flag in flags
    ]
    if not rows:
        return "  (no flags)"
    return format_table(["NAME", "VALUE", "DEFAULT", "CHANGED"], rows)


def _object(json_text: str) -> dict[str, object] | None:
    """A recorded JSON object (empty text: ``{}``); None when the text is not one."""
    try:
        value = json.loads(json_text or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _setting(json_text: str) -> str:
    """A before/after JSON object as ``key=value`` pairs (``{}``: nothing)."""
    setting = _object(json_text)
    if setting is None:
        return json_text
    return " ".join(f"{key}={value}" for key, value in setting.items()) or "-"


def _field(key: str, value: object) -> str:
    """One recorded value for a human: epoch-microsecond times as UTC ("none" for 0)."""
    if key.endswith("_at_us"):
        if not value:
            return "none"
        if isinstance(value, int):
            return _time(Timestamp(seconds=value // 1_000_000))
    return "-" if value is None else str(value)


def _change(before_json: str, after_json: str) -> str:
    """What a change set: each key it set whose value differs from before, as ``key old
    -> new``, and a mark only the after side carries (``forced``: true) as its name. The
    previous change's bookkeeping (who, why, when), which only the before side carries,
    is not shown; JSON that is not an object shows as it is."""
    before, after = _object(before_json), _object(after_json)
    if before is None or after is None:
        return f"{_setting(before_json)} -> {_setting(after_json)}"
    changed = [
        key
        if value is True and key not in before
        else f"{key.removesuffix('_us')} {_field(key, before.get(key))} -> {_field(key, value)}"
        for key, value in after.items()
        if _field(key, before.get(key)) != _field(key, value)
    ]
    return "; ".join(changed) or "(no change)"


def format_history(actions: Iterable[pb.AdminAction]) -> str:
    """One line per change, newest first: when, who, what, on what, what changed, why."""
    rows = [
        [
            _time(action.at),
            shown(action.actor),
            action.action,
            shown(action.target),
            shown(_change(action.before_json, action.after_json)),
            shown(action.reason),
        ]
        for action in actions
    ]
    if not rows:
        return "  (no admin changes)"
    return format_table(["AT", "ACTOR", "ACTION", "TARGET", "CHANGE", "REASON"], rows)


def _age(ts: Timestamp, now_s: float) -> str:
    seconds = max(0.0, now_s - ts.ToMicroseconds() / 1e6)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_servers(servers: Sequence[pb.ServerInfo], now_s: float) -> str:
    """ListServers for a human: one row per server process, its breakers in one cell."""
    if not servers:
        return "  (none registered)"
    rows = [
        [
            s.server_id,
            s.admin_address or "-",
            str(s.pid),
            _age(s.started_at, now_s),
            _age(s.seen_at, now_s),
            "yes" if s.serving else "NO",
            str(s.in_flight),
            str(s.decisions),
            " ".join(f"{name}={state}" for name, state in sorted(s.breakers.items())),
        ]
        for s in servers
    ]
    headers = ["SERVER", "ADMIN", "PID", "UP", "SEEN", "SERVING", "IN FLIGHT", "DECISIONS"]
    return format_table([*headers, "BREAKERS"], rows)


def _format_replicas(status: pb.GetStatusResponse) -> list[str]:
    if not status.replicas:
        return ["  (no replicas)"]
    rows, overrides = [], []
    for replica in status.replicas:
        version = replica.model_version or status.model_versions.get(replica.name, "")
        rows.append(
            [
                replica.name,
                replica.address,
                replica.breaker_state,
                _mode(replica.mode),
                str(replica.recent_calls),
                str(replica.recent_failures),
                f"{100 * replica.breaker_failure_rate:.0f}",
                f"{100 * replica.breaker_slow_call_rate:.0f}",
                f"{replica.recent_p50_ms:.1f}",
                f"{replica.recent_p99_ms:.1f}",
                version[:MODEL_VERSION_SHOWN] or "-",
            ]
        )
        # AUTO has no override to explain; UNSPECIFIED is shown as it is, without one.
        if replica.mode != pb.BREAKER_MODE_AUTO and replica.HasField("override"):
            overrides.append(
                f"  {replica.name} {_mode(replica.mode)} {format_change(replica.override)}"
            )
    headers = [
        "NAME", "ADDRESS", "BREAKER", "MODE", "CALLS", "FAILS", "FAIL%", "SLOW%", "P50MS",
        "P99MS", "MODEL",
    ]  # fmt: skip
    return [format_table(headers, rows), *overrides]


def _format_labels(labels: pb.LabelStatus) -> str:
    """Whether decisions are being labelled: live quality is judged only on labels."""
    if not labels.reported:
        why = f" ({labels.error})" if labels.error else ""
        return f"no labeler reported in the last minute{why}: live quality not measured"
    if labels.stopped:
        return (
            f"LABELS STOPPED: the newest labelled decision is {labels.behind_s:.0f} s behind "
            "the newest decision; live quality is not judged"
        )
    return f"labelling, {labels.behind_s:.0f} s behind the decisions"


def _format_ignored(feeds: Sequence[pb.IgnoredFeed]) -> list[str]:
    return [
        f"  IGNORED {feed.symbol}: every event since {_time(feed.since)} ({feed.events:,} "
        f"events, {feed.reason.replace('_', ' ')}): its features are frozen while its feed "
        "goes on"
        for feed in feeds
    ]


def _format_canary(canary: pb.CanaryStatus, labels: pb.LabelStatus) -> list[str]:
    line = f"  weight {_num(canary.weight)}"
    if canary.HasField("change"):
        line += f" ({format_change(canary.change)})"
    line += f", auto-rollback {'on' if canary.auto_rollback else 'off'}"
    windows = [
        [
            name,
            str(window.decisions),
            f"{window.error_rate:.2%}",
            f"{window.p99_ms:.1f}",
            f"{window.fallback_rate:.2%}",
        ]
        for name, window in (("canary", canary.canary), ("champion", canary.champion))
    ]
    table = format_table(["WINDOW", "DECISIONS", "ERRORS", "P99MS", "FALLBACK"], windows)
    psi = f"{canary.score_psi:.4f}" if canary.score_psi_evaluated else "not evaluated yet"
    lines = [line, table, f"  score psi {psi}"]
    lines += [f"  waiting: {waiting}" for waiting in canary.waiting_for]
    if 0.0 < canary.weight < 1.0:  # a canary runs: whether this server takes a promotion
        refused = canary.promotion_refused
        lines.append(
            f"  promote: refused, {refused}" if refused else "  promote: judged, no breach"
        )
        if not labels.reported or labels.stopped:
            lines.append("  live quality: not judged, no labels (see labels above)")
    return lines


def _format_mirror(mirror: pb.FeatureMirrorStatus) -> str:
    if not mirror.enabled:
        return "read from Redis (no mirror)"
    since = f" since {_time(mirror.since)}" if mirror.HasField("since") else ""
    losses = f", {mirror.losses} subscriptions lost" if mirror.losses else ""
    if mirror.live:
        return f"mirror live, {mirror.symbols} symbols{since}{losses}"
    return f"MIRROR NOT LIVE{since}, reading Redis: {mirror.error or '?'}{losses}"


def _format_drift(drift: pb.DriftStatus) -> list[str]:
    """PSI against the serving model's training reference, each feature marked drifting
    (from watch_psi) or SHIFTED (from act_psi)."""
    if not drift.enabled:
        return ["  (not computed: DECISION_DRIFT__MODEL_STORE is not set)"]
    about = f"  model {drift.model_version[:12] or '?'}, {drift.samples} decisions"
    if drift.problem:
        return [f"{about}: no PSI yet ({drift.problem})"]

    def mark(psi: float) -> str:
        if psi >= drift.act_psi:
            return "SHIFTED"
        return "drifting" if psi >= drift.watch_psi else ""

    rows = [[f.feature, f"{f.psi:.3f}", mark(f.psi)] for f in drift.features]
    if drift.HasField("score_psi"):
        rows.append(["(score)", f"{drift.score_psi:.3f}", mark(drift.score_psi)])
    computed = f", computed {_time(drift.computed_at)}" if drift.HasField("computed_at") else ""
    return [f"{about}{computed}", format_table(["FEATURE", "PSI", ""], rows)]


def format_loss(shared: pb.SharedStateStatus) -> str:
    """The store's control state found gone back by this server (status, top)."""
    return (
        f"LOST THE CONTROL STATE {shared.losses} time(s), last {_time(shared.last_loss_at)}:"
        f" {shared.last_loss} (written back; runbook: control state not read)"
    )


def format_shared(shared: pb.SharedStateStatus) -> tuple[str, str]:
    """The control state's version and where it comes from; how changes reach this
    server (status, top)."""
    read = f", read {_time(shared.synced_at)}" if shared.HasField("synced_at") else ""
    if shared.durable_ok:
        state = f"version {shared.version} from the audit store{read}"
    else:
        state = (
            f"STORE NOT READ (keeping version {shared.version}):"
            f" {shared.durable_error or '?'}{read}"
        )
    if shared.in_sync:
        changes = "announced (Redis pub/sub), applied at once"
    else:
        changes = f"NOT ANNOUNCED, read from the store each second: {shared.error or '?'}"
    return state, changes


def format_status(status: pb.GetStatusResponse) -> str:
    """GetStatus for a human: a header, then one section per topic."""
    shared = status.shared_state
    state, changes = format_shared(shared)
    out = [
        f"server        {status.server_id or '?'}",
        f"shared state  {state}",
        f"changes       {changes}",
        *([f"              {format_loss(shared)}"] if shared.losses else []),
        f"features      {_format_mirror(status.feature_mirror)}",
        f"labels        {_format_labels(status.labels)}",
        "",
        "replicas",
    ]
    out += _format_replicas(status)
    out += ["", "kill switches"]
    out += [
        f"  {switch.scope} ENGAGED {format_change(switch.change)}"
        for switch in status.kill_switches
    ] or ["  (none engaged)"]
    out += ["", "flags", format_flags(status.flags), "", "canary"]
    out += _format_canary(status.canary, status.labels)
    out += ["", "features"]
    if status.features:
        ages = [
            [f.symbol, "no record" if f.age_ms < 0 else f"{f.age_ms:.0f} ms"]
            for f in status.features
        ]
        out.append(format_table(["SYMBOL", "AGE"], ages))
    else:
        out.append("  (no symbols)")
    out += _format_ignored(status.ignored_feeds)
    out += ["", "drift", *_format_drift(status.drift)]
    audit = status.audit
    store = "store ok" if audit.store_ok else "store FAILING"
    backlog = f"  {store}, backlog {_bytes(audit.backlog_bytes)}"
    if audit.full:
        backlog += " (JOURNAL FULL: decisions refused until the store catches up)"
    if audit.last_error:
        backlog += f", last error: {audit.last_error}"
    out += ["", "audit", backlog]
    return "\n".join(out)


def _until(expires_at: Timestamp, has_expiry: bool, ongoing: bool) -> str:
    if has_expiry:
        return f" (until {_time(expires_at)})"
    return " (until changed)" if ongoing else ""


def format_breaker_change(replica: str, response: pb.SetBreakerResponse) -> str:
    ongoing = response.after != pb.BREAKER_MODE_AUTO
    until = _until(response.expires_at, response.HasField("expires_at"), ongoing)
    return f"breaker {replica}: {_mode(response.before)} -> {_mode(response.after)}{until}"


def format_flag_change(response: pb.SetFlagResponse) -> str:
    after = response.after
    if after.HasField("change") and after.change.HasField("expires_at"):
        note = f" (default {after.default_value}, until {_time(after.change.expires_at)})"
    elif after.value == after.default_value:
        note = " (the default)"
    else:
        note = f" (default {after.default_value})"
    return (
        f"flag {after.name or response.before.name}: {response.before.value} -> {after.value}{note}"
    )


def format_canary_change(response: pb.SetCanaryResponse) -> str:
    return f"canary weight: {_num(response.before)} -> {_num(response.after)}"


def format_kill_switch_change(scope: str, response: pb.KillSwitchResponse) -> str:
    def state(engaged: bool) -> str:
        return "engaged" if engaged else "released"

    until = _until(response.expires_at, response.HasField("expires_at"), response.after)
    return f"kill switch {scope}: {state(response.before)} -> {state(response.after)}{until}"


def to_json(message: Message) -> str:
    # Fields at their zero value are printed too: `"in_sync": false` must not vanish.
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
