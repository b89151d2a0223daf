"""decisionctl: arguments, formatting, and the RPC path against an in-process fake server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from core.processes import free_port
from decision_client.v1 import admin_pb2 as pb
from decision_client.v1 import admin_pb2_grpc as pb_grpc
from server.admin import ctl, ctl_connection, ctl_format

# Test tokens of a fake server, not secrets.
TOKEN = "operator-token-0123456789"  # noqa: S105
VIEWER_TOKEN = "viewer-token-0123456789"  # noqa: S105


def _ts(iso: str) -> Timestamp:
    ts = Timestamp()
    ts.FromJsonString(iso)
    return ts


def _status() -> pb.GetStatusResponse:
    return pb.GetStatusResponse(
        server_id="decision-a1",
        shared_state=pb.SharedStateStatus(
            in_sync=False,
            error="redis timeout",
            version=42,
            synced_at=_ts("2026-11-21T09:59:00Z"),
            durable_error="OperationalError: connection refused",
            losses=3,
            last_loss_at=_ts("2026-11-21T09:57:00Z"),
            last_loss="the audit store's control state went back from version 42 to 40",
        ),
        feature_mirror=pb.FeatureMirrorStatus(
            enabled=True,
            live=False,
            error="ConnectionError: reset",
            since=_ts("2026-11-21T09:58:00Z"),
            losses=2,
        ),
        replicas=[
            pb.ReplicaStatus(
                name="primary",
                address="10.0.0.1:7070",
                breaker_state="closed",
                mode=pb.BREAKER_MODE_AUTO,
                recent_calls=1200,
                recent_failures=3,
                breaker_failure_rate=0.13,
                breaker_slow_call_rate=0.5,
                recent_p50_ms=4.12,
                recent_p99_ms=12.9,
                model_version="3f1c2a9b8d7e6f5a4b3c",
            ),
            pb.ReplicaStatus(
                name="secondary",
                address="10.0.0.2:7070",
                breaker_state="open",
                mode=pb.BREAKER_MODE_FORCE_OPEN,
                override=pb.ChangeInfo(
                    changed_by="alice",
                    reason="replica OOM INC-123",
                    changed_at=_ts("2026-11-21T09:45:00Z"),
                    expires_at=_ts("2026-11-21T10:00:00Z"),
                ),
            ),
        ],
        model_versions={"secondary": "aaaabbbbccccdddd"},
        flags=[
            pb.Flag(name="canary_auto_rollback", value="true", default_value="true"),
            pb.Flag(
                name="shadow_sample_rate",
                value="0.05",
                default_value="0.01",
                change=pb.ChangeInfo(changed_by="bob", reason="more shadow"),
            ),
        ],
        kill_switches=[
            pb.KillSwitchState(
                scope="AAPL", change=pb.ChangeInfo(changed_by="carol", reason="halted")
            )
        ],
        canary=pb.CanaryStatus(
            weight=0.1,
            auto_rollback=True,
            canary=pb.CanaryWindow(decisions=500, error_rate=0.02, p99_ms=15.0, fallback_rate=0.01),
            champion=pb.CanaryWindow(decisions=4500, error_rate=0.001, p99_ms=11.0),
            score_psi=0.0312,
            score_psi_evaluated=True,
        ),
        features=[
            pb.SymbolFreshness(symbol="AAPL", age_ms=120.0),
            pb.SymbolFreshness(symbol="MSFT", age_ms=-1.0),
        ],
        audit=pb.AuditBacklog(
            store_ok=False, backlog_bytes=3 * 1024 * 1024, last_error="refused", full=True
        ),
    )


# --- durations and arguments ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["bogus"], "invalid choice"),
        (["breaker", "primary", "force-open"], "--reason"),
        (["breaker", "primary", "sideways", "--reason", "x"], "invalid choice"),
        (
            ["breaker", "primary", "force-open", "--reason", "x", "--ttl", "soon"],
            "invalid duration",
        ),
        (["breaker", "primary", "force-open", "--reason", "  "], "must not be empty"),
        (["canary", "set", "1.5", "--reason", "x"], "must be in [0, 1]"),
        (["kill-switch", "engage", "--reason", "x"], "required"),
        (["status", "--extra"], "unrecognized arguments"),
        (["--timeout", "0", "status"], "positive"),
    ],
)
def test_argument_errors_exit_2(argv: list[str], message: str, capsys) -> None:
    assert ctl.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["breaker", "primary", "auto", "--reason", "x", "--ttl", "5m"],
        ["kill-switch", "release", "*", "--reason", "x", "--ttl", "5m"],
    ],
)
def test_meaningless_ttl_is_refused(argv: list[str], capsys, monkeypatch) -> None:
    monkeypatch.setenv(ctl_connection.TOKEN_ENV, TOKEN)
    assert ctl.main(argv) == 2
    assert "--ttl applies to" in capsys.readouterr().err


def test_common_options_before_or_after_the_command() -> None:
    parser = ctl.build_parser()
    before = parser.parse_args(["--address", "h:1", "--timeout", "2", "status"])
    after = parser.parse_args(["status", "--address", "h:1", "--timeout", "2"])
    assert (before.address, before.timeout) == (after.address, after.timeout) == ("h:1", 2.0)


def test_missing_token_exits_2_naming_the_variables(capsys, monkeypatch) -> None:
    monkeypatch.delenv(ctl_connection.TOKEN_ENV, raising=False)
    monkeypatch.delenv(ctl_connection.TOKEN_FILE_ENV, raising=False)
    assert ctl.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "DECISIONCTL_TOKEN" in err
    assert "--token-file" in err


def test_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert ctl_connection.resolve_token(None, {"DECISIONCTL_TOKEN": " t0 "}) == "t0"
    assert ctl_connection.resolve_token(str(token_file), {"DECISIONCTL_TOKEN": "t0"}) == TOKEN
    assert ctl_connection.resolve_token(None, {"DECISIONCTL_TOKEN_FILE": str(token_file)}) == TOKEN
    with pytest.raises(ctl_connection.UsageError, match="empty"):
        (tmp_path / "empty").write_text("\n")
        ctl_connection.resolve_token(str(tmp_path / "empty"), {})
    with pytest.raises(ctl_connection.UsageError, match="token file"):
        ctl_connection.resolve_token(str(tmp_path / "missing"), {})


# --- formatting ---------------------------------------------------------------------------


def test_format_status_shows_the_key_content() -> None:
    text = ctl_format.format_status(_status())
    for expected in [
        "decision-a1",
        "shared state  STORE NOT READ (keeping version 42): OperationalError: connection"
        " refused, read 2026-11-21T09:59:00Z",
        "changes       NOT ANNOUNCED, read from the store each second: redis timeout",
        "LOST THE CONTROL STATE 3 time(s), last 2026-11-21T09:57:00Z: the audit store's"
        " control state went back from version 42 to 40",
        "10.0.0.1:7070",
        "FORCE_OPEN by alice",
        "until 2026-11-21T10:00:00Z: replica OOM INC-123",
        "3f1c2a9b8d7e",
        "aaaabbbbcccc",  # from model_versions when the replica has none
        "12.9",
        "shadow_sample_rate",
        "0.01",
        "AAPL ENGAGED by carol",
        "weight 0.1",
        "auto-rollback on",
        "0.0312",
        "120 ms",
        "no record",
        "store FAILING",
        "3.0 MiB",
        "JOURNAL FULL: decisions refused",
        "refused",
        "MIRROR NOT LIVE since 2026-11-21T09:58:00Z, reading Redis: ConnectionError: reset",
        "2 subscriptions lost",
    ]:
        assert expected in text, expected
    assert "3f1c2a9b8d7e6" not in text  # model versions are cut to 12 characters
    primary = next(line for line in text.splitlines() if "10.0.0.1" in line)
    assert primary.split()[:8] == [
        "primary", "10.0.0.1:7070", "closed", "AUTO", "1200", "3", "13", "50"
    ]  # fmt: skip


def _servers() -> pb.ListServersResponse:
    return pb.ListServersResponse(
        servers=[
            pb.ServerInfo(
                server_id="decision-a1",
                admin_address="10.0.0.1:50052",
                pid=41,
                started_at=_ts("2026-11-21T08:00:00Z"),
                seen_at=_ts("2026-11-21T09:59:58Z"),
                serving=True,
                in_flight=3,
                decisions=120456,
                breakers={"primary": "closed", "secondary": "closed"},
            ),
            pb.ServerInfo(
                server_id="decision-a2/w1",
                admin_address="10.0.0.2:50052",
                pid=77,
                started_at=_ts("2026-11-21T09:59:00Z"),
                seen_at=_ts("2026-11-21T09:59:56Z"),
                breakers={"secondary": "closed", "primary": "open"},
            ),
        ]
    )


def test_format_servers_one_row_each_with_ages_and_breakers() -> None:
    now_s = _ts("2026-11-21T10:00:00Z").ToMicroseconds() / 1e6
    lines = ctl_format.format_servers(_servers().servers, now_s).splitlines()
    assert lines[0].split() == [
        "SERVER", "ADMIN", "PID", "UP", "SEEN", "SERVING", "IN", "FLIGHT", "DECISIONS", "BREAKERS"
    ]  # fmt: skip
    assert lines[1].split() == [
        "decision-a1", "10.0.0.1:50052", "41", "2.0h", "2s", "yes", "3", "120456",
        "primary=closed", "secondary=closed",
    ]  # fmt: skip
    assert lines[2].split()[3:6] == ["60s", "4s", "NO"]
    assert lines[2].endswith("primary=open secondary=closed")  # sorted by replica
    assert ctl_format.format_servers([], now_s) == "  (none registered)"


def test_format_status_says_whether_this_server_takes_a_promotion() -> None:
    def promote_line(canary: pb.CanaryStatus) -> list[str]:
        text = ctl_format.format_status(pb.GetStatusResponse(canary=canary))
        return [line.strip() for line in text.splitlines() if "promote:" in line]

    refused = "not judged yet: in the last 30 s under the weight now set, score PSI waits"
    waiting = "score PSI waits for 500 scores a side (canary 120, champion 130)"
    canary = pb.CanaryStatus(weight=0.1, promotion_refused=refused, waiting_for=[waiting])
    assert promote_line(canary) == [f"promote: refused, {refused}"]
    text = ctl_format.format_status(pb.GetStatusResponse(canary=canary))
    assert "  score psi not evaluated yet" in text
    assert f"  waiting: {waiting}" in text
    evaluated = pb.CanaryStatus(weight=0.1, score_psi=0.0312, score_psi_evaluated=True)
    assert "  score psi 0.0312" in ctl_format.format_status(pb.GetStatusResponse(canary=evaluated))
    assert promote_line(pb.CanaryStatus(weight=0.1)) == ["promote: judged, no breach"]
    # No canary running, or promoted already: nothing to say about a promotion.
    assert promote_line(pb.CanaryStatus(weight=0.0, promotion_refused="no canary")) == []
    assert promote_line(pb.CanaryStatus(weight=1.0)) == []


def test_format_status_says_whether_decisions_are_labelled_and_which_feeds_are_ignored() -> None:
    def lines(**fields: object) -> list[str]:
        text = ctl_format.format_status(pb.GetStatusResponse(**fields))  # type: ignore[arg-type]
        return [line.strip() for line in text.splitlines()]

    flowing = pb.LabelStatus(reported=True, behind_s=6.8)
    assert "labels        labelling, 7 s behind the decisions" in lines(labels=flowing)
    stopped = pb.LabelStatus(reported=True, behind_s=250, stopped=True)
    running = pb.CanaryStatus(weight=0.3)
    text = lines(labels=stopped, canary=running)
    assert (
        "labels        LABELS STOPPED: the newest labelled decision is 250 s behind the "
        "newest decision; live quality is not judged"
    ) in text
    assert "live quality: not judged, no labels (see labels above)" in text
    assert "live quality: not judged, no labels (see labels above)" not in lines(
        labels=flowing, canary=running
    )
    silent = "\n".join(lines(labels=pb.LabelStatus(reported=False, error="not read: Timeout")))
    assert "no labeler reported in the last minute (not read: Timeout)" in silent
    feed = pb.IgnoredFeed(symbol="SKL-USD", events=1203, reason="old_session")
    feed.since.FromSeconds(1_800_000_000)
    assert (
        "IGNORED SKL-USD: every event since 2027-01-15T08:00:00Z (1,203 events, old "
        "session): its features are frozen while its feed goes on"
    ) in lines(ignored_feeds=[feed])


def test_reasons_stored_with_control_characters_are_shown_escaped() -> None:
    """The server refuses them now; one stored before cannot forge a line or a colour."""
    forged = "line1\nkill switches\n  (none engaged)\x1b[31mRED\x1b[0m"
    change = pb.ChangeInfo(changed_by="oncall", reason=forged)
    status = pb.GetStatusResponse(
        kill_switches=[pb.KillSwitchState(scope="SOL-USD", change=change)]
    )
    text = ctl_format.format_status(status)
    assert "\x1b" not in text
    engaged = [line for line in text.splitlines() if "ENGAGED" in line]
    assert engaged == [
        "  SOL-USD ENGAGED by oncall: line1\\nkill switches\\n  (none engaged)\\x1b[31mRED\\x1b[0m"
    ]
    history = ctl_format.format_history(
        [pb.AdminAction(actor="oncall", action="kill_switch", target="SOL-USD", reason=forged)]
    )
    assert len(history.splitlines()) == 2 and "\x1b" not in history


def test_format_status_of_an_empty_response() -> None:
    text = ctl_format.format_status(pb.GetStatusResponse())
    assert "read from Redis (no mirror)" in text
    assert "(no replicas)" in text
    assert "(none engaged)" in text
    assert "store FAILING" in text
    assert "JOURNAL FULL" not in text


def test_format_status_marks_drifting_and_shifted_features() -> None:
    drift = pb.DriftStatus(
        enabled=True,
        model_version="3f1c2a9b8d7e6f5a",
        samples=5000,
        scores=4200,
        features=[
            pb.FeatureDrift(feature="spread_bps", psi=0.02),
            pb.FeatureDrift(feature="ofi_5s", psi=0.17),
            pb.FeatureDrift(feature="imbalance_l1", psi=0.4),
        ],
        score_psi=0.05,
        watch_psi=0.1,
        act_psi=0.25,
    )
    lines = ctl_format.format_status(pb.GetStatusResponse(drift=drift)).splitlines()
    assert "  model 3f1c2a9b8d7e, 5000 decisions" in lines
    marks = {line.split()[0]: line.split()[2:] for line in lines if "0." in line}
    assert marks["spread_bps"] == []
    assert marks["ofi_5s"] == ["drifting"]
    assert marks["imbalance_l1"] == ["SHIFTED"]
    assert marks["(score)"] == []


def test_format_status_says_why_there_is_no_drift() -> None:
    text = ctl_format.format_status(pb.GetStatusResponse())
    assert "(not computed: DECISION_DRIFT__MODEL_STORE is not set)" in text
    waiting = pb.DriftStatus(enabled=True, model_version="abc", samples=12, problem="too few")
    text = ctl_format.format_status(pb.GetStatusResponse(drift=waiting))
    assert "model abc, 12 decisions: no PSI yet (too few)" in text


def test_change_lines() -> None:
    breaker = pb.SetBreakerResponse(
        before=pb.BREAKER_MODE_AUTO,
        after=pb.BREAKER_MODE_FORCE_OPEN,
        expires_at=_ts("2026-11-21T10:00:00Z"),
    )
    assert ctl_format.format_breaker_change("primary", breaker) == (
        "breaker primary: AUTO -> FORCE_OPEN (until 2026-11-21T10:00:00Z)"
    )
    back = pb.SetBreakerResponse(before=pb.BREAKER_MODE_FORCE_OPEN, after=pb.BREAKER_MODE_AUTO)
    assert (
        ctl_format.format_breaker_change("primary", back) == "breaker primary: FORCE_OPEN -> AUTO"
    )
    flag = pb.SetFlagResponse(
        before=pb.Flag(name="shadow_sample_rate", value="0.01", default_value="0.01"),
        after=pb.Flag(name="shadow_sample_rate", value="0.05", default_value="0.01"),
    )
    assert (
        ctl_format.format_flag_change(flag)
        == "flag shadow_sample_rate: 0.01 -> 0.05 (default 0.01)"
    )
    canary = pb.SetCanaryResponse(before=0.1, after=1.0)
    assert ctl_format.format_canary_change(canary) == "canary weight: 0.1 -> 1"
    switch = pb.KillSwitchResponse(before=False, after=True)
    assert ctl_format.format_kill_switch_change("*", switch) == (
        "kill switch *: released -> engaged (until changed)"
    )


def test_history_lines() -> None:
    actions = [
        pb.AdminAction(
            at=_ts("2026-11-21T10:00:00Z"),
            actor="alice",
            action="set_breaker",
            target="primary",
            before_json='{"mode": "AUTO"}',
            after_json='{"expires_at_us": 0, "mode": "FORCE_OPEN"}',
            reason="INC-7",
        ),
        pb.AdminAction(
            at=_ts("2026-11-21T09:30:00Z"),
            actor="bob",
            action="set_breaker",
            target="primary",
            before_json='{"changed_at_us": 1795591800000000, "changed_by": "alice", '
            '"expires_at_us": 0, "mode": "FORCE_OPEN", "reason": "INC-7"}',
            after_json='{"expires_at_us": 1795256100000000, "mode": "AUTO"}',
            reason="recovered",
        ),
        pb.AdminAction(
            at=_ts("2026-11-21T09:20:00Z"),
            actor="bob",
            action="set_flag",
            target="shadow_sample_rate",
            before_json='{"value": 0.2}',
            after_json='{"value": 0.2}',
            reason="again",
        ),
        pb.AdminAction(
            at=_ts("2026-11-21T09:00:00Z"),
            actor="bob",
            action="set_canary",
            target="canary",
            before_json="{}",
            after_json="not json",
            reason="start",
        ),
        pb.AdminAction(
            at=_ts("2026-11-21T08:00:00Z"),
            actor="carol",
            action="set_canary",
            target="challenger",
            before_json='{"weight": 0.0}',
            after_json='{"forced": true, "weight": 1.0}',
            reason="INC-9",
        ),
    ]
    lines = ctl_format.format_history(actions).splitlines()
    assert lines[0].split() == ["AT", "ACTOR", "ACTION", "TARGET", "CHANGE", "REASON"]
    assert lines[1].split() == [
        "2026-11-21T10:00:00Z",
        "alice",
        "set_breaker",
        "primary",
        "mode",
        "AUTO",
        "->",
        "FORCE_OPEN",  # no expiry before or after: not a change
        "INC-7",
    ]
    # Only what changed, times in UTC; the previous change's bookkeeping is left out.
    assert "expires_at none -> 2026-11-21T10:15:00Z; mode FORCE_OPEN -> AUTO" in lines[2]
    assert "alice" not in lines[2] and "INC-7" not in lines[2] and "changed" not in lines[2]
    assert "(no change)" in lines[3]
    assert "- -> not json" in lines[4]
    assert "forced; weight 0.0 -> 1.0" in lines[5]  # a mark only the after side has
    assert ctl_format.format_history([]) == "  (no admin changes)"


def test_json_keeps_field_names_and_zero_values() -> None:
    data = json.loads(ctl_format.to_json(_status()))
    assert data["server_id"] == "decision-a1"
    assert data["shared_state"]["in_sync"] is False
    assert data["replicas"][1]["mode"] == "BREAKER_MODE_FORCE_OPEN"


# --- the RPC path, against a fake server ----------------------------------------------------


class FakeAdmin(pb_grpc.AdminServiceServicer):
    """Answers with canned responses; the viewer token may only read."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.authorization: list[str] = []
        self.fleet_error = False

    def _admit(self, context: Any, *, change: bool) -> None:
        value = dict(context.invocation_metadata()).get("authorization", "")
        self.authorization.append(value)
        if value not in (f"Bearer {TOKEN}", f"Bearer {VIEWER_TOKEN}"):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if change and value != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "viewer may not call it")

    def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        self._admit(context, change=False)
        return _status()

    def ListFlags(self, request: Any, context: Any) -> pb.ListFlagsResponse:
        self._admit(context, change=False)
        return pb.ListFlagsResponse(flags=_status().flags)

    def ListAdminActions(self, request: Any, context: Any) -> pb.ListAdminActionsResponse:
        self._admit(context, change=False)
        self.requests.append(request)
        return pb.ListAdminActionsResponse(
            actions=[pb.AdminAction(actor="alice", action="set_flag", target="x", reason="why")]
        )

    def ListServers(self, request: Any, context: Any) -> pb.ListServersResponse:
        self._admit(context, change=False)
        if self.fleet_error:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fleet list unavailable: redis down")
        return _servers()

    def SetBreaker(self, request: Any, context: Any) -> pb.SetBreakerResponse:
        self._admit(context, change=True)
        self.requests.append(request)
        return pb.SetBreakerResponse(
            before=pb.BREAKER_MODE_AUTO, after=request.mode, expires_at=_ts("2026-11-21T10:00:00Z")
        )

    def SetFlag(self, request: Any, context: Any) -> pb.SetFlagResponse:
        self._admit(context, change=True)
        self.requests.append(request)
        if request.name != "shadow_sample_rate":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown flag {request.name}")
        value = "0.01" if request.reset else request.value
        return pb.SetFlagResponse(
            before=pb.Flag(name=request.name, value="0.05", default_value="0.01"),
            after=pb.Flag(name=request.name, value=value, default_value="0.01"),
        )

    def SetCanary(self, request: Any, context: Any) -> pb.SetCanaryResponse:
        self._admit(context, change=True)
        self.requests.append(request)
        return pb.SetCanaryResponse(before=0.1, after=request.weight)

    def KillSwitch(self, request: Any, context: Any) -> pb.KillSwitchResponse:
        self._admit(context, change=True)
        self.requests.append(request)
        return pb.KillSwitchResponse(before=not request.engaged, after=request.engaged)


@pytest.fixture
def fake() -> Iterator[tuple[FakeAdmin, str]]:
    servicer = FakeAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_AdminServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


@pytest.fixture
def operator(monkeypatch) -> None:
    monkeypatch.setenv(ctl_connection.TOKEN_ENV, TOKEN)
    monkeypatch.delenv(ctl_connection.TOKEN_FILE_ENV, raising=False)


def test_status_sends_the_token_and_shows_the_fleet(fake, operator, capsys) -> None:
    servicer, address = fake
    assert ctl.main(["--address", address, "status"]) == 0
    out, err = capsys.readouterr()
    assert "decision-a1" in out
    assert servicer.authorization == [f"Bearer {TOKEN}"] * 2  # GetStatus, ListServers
    assert TOKEN not in out + err
    fleet = out.split("\nfleet\n", 1)[1]
    rows = [line.split()[:3] for line in fleet.splitlines()[1:]]
    assert rows == [
        ["decision-a1", "10.0.0.1:50052", "41"],
        ["decision-a2/w1", "10.0.0.2:50052", "77"],
    ]


def test_status_of_a_server_that_cannot_list_the_fleet(fake, operator, capsys) -> None:
    servicer, address = fake
    servicer.fleet_error = True
    assert ctl.main(["--address", address, "status"]) == 0
    out = capsys.readouterr().out
    assert "decision-a1" in out
    assert "(not listed: UNAVAILABLE fleet list unavailable: redis down)" in out


def test_servers_json(fake, operator, capsys) -> None:
    _, address = fake
    assert ctl.main(["servers", "--json", "--address", address]) == 0
    listed = json.loads(capsys.readouterr().out)["servers"]
    assert [s["server_id"] for s in listed] == ["decision-a1", "decision-a2/w1"]
    assert listed[1]["breakers"] == {"primary": "open", "secondary": "closed"}


def test_status_json(fake, operator, capsys) -> None:
    _, address = fake
    assert ctl.main(["status", "--json", "--address", address]) == 0
    assert json.loads(capsys.readouterr().out)["canary"]["weight"] == 0.1


def test_address_from_the_environment(fake, operator, capsys, monkeypatch) -> None:
    _, address = fake
    monkeypatch.setenv(ctl_connection.ADDRESS_ENV, address)
    assert ctl.main(["flags"]) == 0
    assert "shadow_sample_rate" in capsys.readouterr().out


def test_token_file_option(fake, capsys, monkeypatch, tmp_path: Path) -> None:
    servicer, address = fake
    monkeypatch.delenv(ctl_connection.TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n")
    argv = ["--address", address, "--token-file", str(tmp_path / "token"), "flags"]
    assert ctl.main(argv) == 0
    assert servicer.authorization == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize(
    ("argv", "line", "expected"),
    [
        (
            ["breaker", "secondary", "force-open", "--reason", "OOM", "--ttl", "15m"],
            "breaker secondary: AUTO -> FORCE_OPEN (until 2026-11-21T10:00:00Z)",
            pb.SetBreakerRequest(
                replica="secondary", mode=pb.BREAKER_MODE_FORCE_OPEN, reason="OOM", ttl_s=900
            ),
        ),
        (
            ["flag", "set", "shadow_sample_rate", "0.2", "--reason", "more"],
            "flag shadow_sample_rate: 0.05 -> 0.2 (default 0.01)",
            pb.SetFlagRequest(name="shadow_sample_rate", value="0.2", reason="more"),
        ),
        (
            ["flag", "reset", "shadow_sample_rate", "--reason", "done"],
            "flag shadow_sample_rate: 0.05 -> 0.01 (the default)",
            pb.SetFlagRequest(name="shadow_sample_rate", reset=True, reason="done"),
        ),
        (
            ["canary", "promote", "--reason", "good"],
            "canary weight: 0.1 -> 1",
            pb.SetCanaryRequest(weight=1.0, reason="good"),
        ),
        (
            ["canary", "promote", "--force", "--reason", "the fix, INC-9"],
            "canary weight: 0.1 -> 1",
            pb.SetCanaryRequest(weight=1.0, reason="the fix, INC-9", force=True),
        ),
        (
            ["canary", "rollback", "--reason", "bad"],
            "canary weight: 0.1 -> 0",
            pb.SetCanaryRequest(weight=0.0, reason="bad"),
        ),
        (
            ["canary", "set", "0.25", "--reason", "ramp"],
            "canary weight: 0.1 -> 0.25",
            pb.SetCanaryRequest(weight=0.25, reason="ramp"),
        ),
        (
            ["kill-switch", "engage", "*", "--reason", "halt", "--ttl", "90"],
            "kill switch *: released -> engaged (until changed)",
            pb.KillSwitchRequest(scope="*", engaged=True, reason="halt", ttl_s=90),
        ),
    ],
)
def test_change_commands(fake, operator, capsys, argv, line, expected) -> None:
    servicer, address = fake
    assert ctl.main(["--address", address, *argv]) == 0
    assert capsys.readouterr().out.strip() == line
    assert servicer.requests == [expected]


def test_history_sends_its_filters_and_prints_a_line_per_change(fake, operator, capsys) -> None:
    servicer, address = fake
    before_us = time.time_ns() // 1000
    argv = ["--address", address, "history", "--since", "2h", "--actor", "alice"]
    assert ctl.main([*argv, "--target", "x", "--limit", "5"]) == 0
    [request] = servicer.requests
    assert (request.actor, request.target, request.limit) == ("alice", "x", 5)
    assert abs(before_us - 7_200_000_000 - request.since.ToMicroseconds()) < 60_000_000
    assert not request.HasField("until")
    assert "set_flag" in capsys.readouterr().out

    servicer.requests.clear()
    window = ["--since", "2026-11-21T09:00", "--until", "2026-11-21T10:00+01:00"]
    assert ctl.main(["--address", address, "history", *window]) == 0
    [request] = servicer.requests
    assert request.since.ToJsonString() == "2026-11-21T09:00:00Z"
    assert request.until.ToJsonString() == "2026-11-21T09:00:00Z"  # given in UTC+1


def test_permission_denied_exits_2(fake, capsys, monkeypatch) -> None:
    _, address = fake
    monkeypatch.setenv(ctl_connection.TOKEN_ENV, VIEWER_TOKEN)
    argv = ["--address", address, "canary", "promote", "--reason", "x"]
    assert ctl.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "decisionctl: permission denied: viewer may not call it"
    )


@pytest.mark.parametrize(
    "content", [b"tok\nen-0123", b"tok en", b"\xff\xfetoken", "tökén".encode()]
)
def test_a_token_file_that_holds_no_token_exits_2_in_one_line(
    fake, capsys, tmp_path: Path, content: bytes
) -> None:
    """Before: a gRPC core trace (a header value it refuses) and exit 1."""
    _, address = fake
    token_file = tmp_path / "token"
    token_file.write_bytes(content + b"\n")
    assert ctl.main(["--address", address, "--token-file", str(token_file), "status"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"decisionctl: token file {token_file} does not hold a token: one word of printable"
        " ASCII expected\n"
    )


def test_the_decide_port_is_named_for_what_it_is(fake, operator, capsys) -> None:
    """An address that serves no AdminService (the Decide port, say): a hint, not
    "Method not found!" alone."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert ctl.main(["--address", f"127.0.0.1:{port}", "status"]) == 1
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert err.startswith(f"decisionctl: 127.0.0.1:{port} does not serve decision.v1.AdminService")
    assert "is it the admin port?" in err and len(err.splitlines()) == 1


def test_a_negative_duration_and_a_time_without_its_unit_say_what_is_wrong(
    operator, capsys
) -> None:
    argv = ["kill-switch", "engage", "SOL-USD", "--reason", "x", "--ttl", "-5m"]
    assert ctl.main(argv) == 2
    assert "--ttl: invalid duration '-5m': must be positive" in capsys.readouterr().err
    assert ctl.main(["history", "--since", "90"]) == 2
    err = capsys.readouterr().err
    assert "invalid time '90': a time ago names its unit (90s, 90m or 90h" in err


def test_unknown_token_exits_2(fake, capsys, monkeypatch) -> None:
    _, address = fake
    monkeypatch.setenv(ctl_connection.TOKEN_ENV, "wrong-token-0123456789")
    assert ctl.main(["--address", address, "status"]) == 2
    err = capsys.readouterr().err
    assert "decisionctl: unauthenticated: unknown bearer token" in err
    assert "wrong-token" not in err


def test_invalid_argument_exits_2(fake, operator, capsys) -> None:
    _, address = fake
    assert ctl.main(["--address", address, "flag", "set", "nope", "1", "--reason", "x"]) == 2
    assert "decisionctl: invalid argument: unknown flag nope" in capsys.readouterr().err


def test_unreachable_server_exits_3(operator, capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert ctl.main(["--address", address, "--timeout", "0.5", "status"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("decisionctl: ")
    assert address in err


# --- replay -------------------------------------------------------------------------------


def test_replay_passes_every_argument_through(monkeypatch) -> None:
    import server.audit.__main__ as audit_cli

    seen: list[list[str] | None] = []

    def fake_main(argv: list[str] | None = None, *, prog: str = "") -> int:
        assert prog == "decisionctl"
        seen.append(argv)
        return 1

    monkeypatch.setattr(audit_cli, "main", fake_main)
    argv = ["replay", "--since", "2026-11-21T09:00", "--until", "2026-11-21T10:00", "--json"]
    assert ctl.main(argv) == 1
    assert ctl.main(["replay", "--database-url", "sqlite://", "--decision-id", "abc"]) == 1
    assert seen == [
        ["replay", "--since", "2026-11-21T09:00", "--until", "2026-11-21T10:00", "--json"],
        ["--database-url", "sqlite://", "replay", "--decision-id", "abc"],
    ]


def test_replay_usage_error_is_the_audit_clis_under_decisionctls_name(capsys) -> None:
    assert ctl.main(["replay", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err
    assert err.startswith("usage: decisionctl ")
    assert ctl.main(["replay", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: decisionctl replay ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cert-file", "c.pem"], "--cert-file and --key-file go together"),
        (["--server-name", "admin.internal"], "--server-name needs TLS"),
        (["--ca-file", "/nonexistent/ca.pem"], "CA file /nonexistent/ca.pem"),
    ],
)
def test_tls_option_errors_exit_2(options: list[str], message: str, operator, capsys) -> None:
    assert ctl.main([*options, "status"]) == 2
    assert message in capsys.readouterr().err


# --- top ----------------------------------------------------------------------------------


def _sample(at_s: float, seen: str, primary: int, rules: int, timeouts: int, slow: int = 0) -> Any:
    """A frame of one server; ``slow`` of its primary answers took 20-30 ms, the rest
    4-5 ms (half) and 5-7.5 ms."""
    from core.histogram import LATENCY_BOUNDS_S
    from server.admin.ctl_top import Sample

    counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
    fast = primary - slow
    counts[LATENCY_BOUNDS_S.index(0.005)] = fast // 2
    counts[LATENCY_BOUNDS_S.index(0.0075)] = fast - fast // 2
    counts[LATENCY_BOUNDS_S.index(0.03)] = slow

    server = pb.ServerInfo(
        server_id="decision-a1",
        admin_address="10.0.0.1:50052",
        started_at=_ts("2026-11-21T08:00:00Z"),
        seen_at=_ts(seen),
        serving=True,
        decisions=primary + rules,
        breakers={"primary": "half-open"},
        decisions_by_source={"primary": primary, "rules": rules},
        fallbacks={"model_timeout": timeouts},
        shadow_scored=primary // 10,
        shadow_agreed=primary // 20,
        latency={"primary": pb.LatencyCounts(counts=counts)},
        latency_bounds_s=LATENCY_BOUNDS_S,
    )
    return Sample(at_s, _status(), [server])


def test_top_frame_shows_rates_from_the_counts_over_the_servers_own_write_times() -> None:
    from rich.console import Console

    from server.admin.ctl_top import Baselines, render

    before = _sample(0.0, "2026-11-21T10:00:00Z", primary=1000, rules=100, timeouts=100)
    # The frames are 1 s apart, the server's writes 2 s apart: its rates are over 2 s.
    after = _sample(1.0, "2026-11-21T10:00:02Z", primary=1180, rules=120, timeouts=120, slow=2)
    baselines = Baselines()
    first = Console(record=True, width=160)
    first.print(render(before, baselines.update(before.servers), "127.0.0.1:50052"))
    assert "(rates from the next frame)" in first.export_text()

    console = Console(record=True, width=160)
    console.print(render(after, baselines.update(after.servers), "127.0.0.1:50052"))
    text = console.export_text()
    assert "1 servers  100 decisions/s, model 90.0%" in text
    sources = text.split("decisions/s by source", 1)[1].splitlines()
    assert sources[1].split() == ["PRIMARY", "RULES"]
    assert sources[2].split() == ["per", "s", "90.0", "10.0"]
    # Of the 180 primary answers since the baseline, 89 took up to 5 ms, 89 up to 7.5 ms
    # and 2 from 20 to 30 ms: the median is in the 7.5 ms bucket, the 99th in the 30.
    assert sources[3].split() == ["p50", "ms", "≤7.5", "-"]
    assert sources[4].split() == ["p99", "ms", "≤30", "-"]
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert lines["model_timeout"] == ["model_timeout", "10.0"]
    assert lines["decision-a1"][:6] == [
        "decision-a1", "10.0.0.1:50052", "yes", "100.0", "0", "primary=half-open"
    ]  # fmt: skip
    assert "primary=half-open" in text
    assert "shadow: 50% agree (9.0/s)" in text
    assert "replicas (as decision-a1 sees them)" in text
    assert lines["REPLICA"][5:7] == ["FAIL%", "SLOW%"]

    # A frame that finds the same entries again (top reads as often as servers write)
    # shows the same rates, not blanks.
    again = Console(record=True, width=160)
    again.print(render(after, baselines.update(after.servers), "127.0.0.1:50052"))
    assert "100 decisions/s, model 90.0%" in again.export_text()


def test_top_piped_prints_every_frame_in_turn() -> None:
    """Not on a terminal (``decisionctl top --frames 3 > top.log``) each frame follows the
    last, each ending its line; on a terminal they replace each other in place."""
    import io

    from rich.console import Console

    from server.admin.ctl_top import run

    samples = iter(
        [
            _sample(0.0, "2026-11-21T10:00:00Z", primary=1000, rules=100, timeouts=100),
            _sample(1.0, "2026-11-21T10:00:02Z", primary=1180, rules=120, timeouts=120),
            _sample(2.0, "2026-11-21T10:00:04Z", primary=1360, rules=140, timeouts=140),
        ]
    )
    out = io.StringIO()
    piped = Console(file=out, width=160, force_terminal=False)
    run(lambda: next(samples), "127.0.0.1:50052", interval_s=0.0, frames=3, console=piped)
    text = out.getvalue()
    assert text.count("decisionctl top") == 3
    assert text.count("(rates from the next frame)") == 1  # the first frame only
    assert text.count("100 decisions/s, model 90.0%") == 2
    assert text.endswith("\n")


def test_top_shows_what_it_cannot_read_and_stops_only_on_a_refused_token(
    fake, operator, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    servicer, address = fake
    servicer.fleet_error = True
    argv = ["--address", address, "top", "--frames", "2", "--interval", "0.01"]
    assert ctl.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("NOT READ: fleet list: unavailable: fleet list unavailable: redis down") == 2
    assert out.count("(rates when the fleet list reads again)") == 2
    monkeypatch.setenv(ctl_connection.TOKEN_ENV, "wrong-token-0123456789")
    assert ctl.main(argv) == 2
    assert "unauthenticated" in capsys.readouterr().err


def test_top_finds_a_local_stacks_other_metrics_and_says_when_they_are_unreachable() -> None:
    from server.admin.ctl_top import consumer_text, local_stack_metrics, quality_text

    assert local_stack_metrics("127.0.0.1:51052") == (
        "http://127.0.0.1:10480/metrics",
        "http://127.0.0.1:10490/metrics",
    )
    assert local_stack_metrics("decision-admin.prod:50052") == ("", "")
    closed = f"http://127.0.0.1:{free_port()}/metrics"
    assert consumer_text(closed).startswith("unreachable (")
    assert quality_text(closed).startswith("unreachable (")
    assert consumer_text("") == quality_text("") == ""


def test_top_shows_how_many_labelled_decisions_each_auc_is_of(monkeypatch) -> None:
    from prometheus_client.samples import Sample

    from server.admin import ctl_top

    def labels(role: str) -> dict[str, str]:
        return {"model": "champion", "model_version": "60594984abcdef", "role": role}

    page = {
        "decision_quality_auc": [
            Sample("decision_quality_auc", labels("shadow"), 0.61),
            Sample("decision_quality_auc", labels("served"), 1.0),
        ],
        "decision_quality_samples": [
            Sample("decision_quality_samples", labels("served"), 4.0),
            Sample("decision_quality_samples", labels("shadow"), 1250.0),
        ],
    }
    monkeypatch.setattr(ctl_top, "scrape", lambda url: page)
    assert ctl_top.quality_text("http://127.0.0.1:9490/metrics") == (
        "champion 60594984 (served) 1.000 of 4, champion 60594984 (shadow) 0.610 of 1,250"
    )


def test_replay_reads_no_store_it_would_have_to_create(tmp_path, monkeypatch, capsys) -> None:
    """Run outside the checkout, the default (relative) SQLite store is not there: one
    line says where it looked, and no empty store is left behind."""
    monkeypatch.chdir(tmp_path)
    assert ctl.main(["replay", "--since", "10m"]) == 2
    err = capsys.readouterr().err
    assert f"no audit store at {tmp_path / '.run/audit/audit.db'}" in err
    assert "--database-url" in err
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "empty.db").touch()  # a file, but no audit store in it
    assert ctl.main(["replay", "--database-url", "sqlite:///empty.db", "--since", "1h"]) == 2
    assert "no such table: decisions" in capsys.readouterr().err
