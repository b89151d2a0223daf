"""The ghz config files in loadtest/ghz/ are ones ghz would run as meant: only keys ghz
reads, the types it parses, our method by server reflection, and request data our server
accepts. ghz (a Go binary) is not installed here, so its documented options are the
reference; ghz ignores unknown JSON keys silently, which is why a misspelt key must fail
here instead."""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import pytest
from google.protobuf import json_format, message_factory

from decision_client.v1 import decision_pb2
from loadtest.locust_scenarios import FED_SYMBOLS, is_loopback
from server.errors import InvalidArgument
from server.validation import order_from_pb
from tests.conftest import REPO

GHZ_DIR = REPO / "loadtest" / "ghz"
SCENARIOS = {"steady", "burst", "primary-failure", "stale-features", "stream"}

# The config file keys are the JSON tags of ghz's runner.Config, typed as ghz parses them.
# Source: bojand/ghz runner/config.go (`Config`, commit 37ed69e00c42), plus the options
# added since that ghz.sh/docs/options lists, whose config keys are their flag names
# (stream-call-*, stream-dynamic-messages, max-*-message-size, lb-strategy, count-errors,
# disable-template-*). Durations are Go duration strings (time.ParseDuration).
STRING_KEYS = {
    "proto",
    "protoset",
    "call",
    "cacert",
    "cert",
    "key",
    "cname",
    "authority",
    "concurrency-schedule",
    "duration-stop",
    "data-file",
    "binary-file",
    "metadata-file",
    "output",
    "format",
    "debug",
    "host",
    "name",
    "load-schedule",
    "lb-strategy",
    "max-recv-message-size",
    "max-send-message-size",
}
BOOL_KEYS = {
    "skipTLS",
    "insecure",
    "async",
    "enable-compression",
    "stream-dynamic-messages",
    "count-errors",
    "disable-template-functions",
    "disable-template-data",
}
UINT_KEYS = {
    "skipFirst",
    "total",
    "concurrency",
    "concurrency-start",
    "concurrency-end",
    "connections",
    "rps",
    "cpus",
    "load-start",
    "load-end",
    "stream-call-count",
}
INT_KEYS = {"concurrency-step", "load-step"}
DURATION_KEYS = {
    "concurrency-step-duration",
    "concurrency-max-duration",
    "duration",
    "max-duration",
    "timeout",
    "stream-interval",
    "stream-call-duration",
    "connect-timeout",
    "keepalive",
    "load-step-duration",
    "load-max-duration",
}
STRING_MAP_KEYS = {"metadata", "tags", "reflect-metadata"}
STRING_LIST_KEYS = {"import-paths"}
DATA_KEY = "data"
GHZ_CONFIG_KEYS = (
    STRING_KEYS
    | BOOL_KEYS
    | UINT_KEYS
    | INT_KEYS
    | DURATION_KEYS
    | STRING_MAP_KEYS
    | STRING_LIST_KEYS
    | {DATA_KEY}
)
ENUMS = {
    "format": {"summary", "csv", "json", "pretty", "html", "influx-summary", "influx-details"},
    "load-schedule": {"const", "step", "line"},
    "concurrency-schedule": {"const", "step", "line"},
    "duration-stop": {"close", "ignore", "wait"},
}
# Reflection is how these configs find the method: no proto source of any kind.
REFLECTION_EXCLUDES = {"proto", "protoset", "import-paths"}
# Our servers speak plaintext on loopback; TLS options would contradict "insecure".
TLS_KEYS = {"cacert", "cert", "key", "cname", "skipTLS"}

_GO_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")
_TEMPLATE = re.compile(r"{{(.*?)}}")
# ghz's call template data (ghz.sh/docs/calldata), with a plausible value each.
TEMPLATE_SAMPLES = {
    "WorkerID": "g1c0",
    "RequestNumber": "12345",
    "FullyQualifiedName": "decision.v1.DecisionService.Decide",
    "MethodName": "Decide",
    "ServiceName": "DecisionService",
    "InputName": "DecideRequest",
    "OutputName": "DecideResponse",
    "IsClientStreaming": "false",
    "IsServerStreaming": "false",
    "Timestamp": "2026-11-21T09:00:00Z",
    "TimestampUnix": "1795338000",
    "TimestampUnixMilli": "1795338000000",
    "TimestampUnixNano": "1795338000000000000",
    "UUID": str(uuid.UUID(int=1)),
}
# ghz's template functions (since v0.58), each rendered anew per message.
TEMPLATE_FUNCTIONS = {"newUUID": str(uuid.UUID(int=2))}


def go_duration_ok(value: object) -> bool:
    return isinstance(value, str) and bool(_GO_DURATION.fullmatch(value))


def _type_problem(key: str, value: object) -> str | None:
    def is_int(v: object) -> bool:  # bool is an int in Python, not in Go's JSON
        return isinstance(v, int) and not isinstance(v, bool)

    def is_str_map(v: object) -> bool:
        return isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        )

    checks = [
        (STRING_KEYS, lambda v: isinstance(v, str), "a string"),
        (BOOL_KEYS, lambda v: isinstance(v, bool), "true or false"),
        (UINT_KEYS, lambda v: is_int(v) and v >= 0, "an integer >= 0"),
        (INT_KEYS, is_int, "an integer"),
        (DURATION_KEYS, go_duration_ok, 'a Go duration string such as "10s"'),
        (STRING_MAP_KEYS, is_str_map, "an object of strings"),
        (
            STRING_LIST_KEYS,
            lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "a list of strings",
        ),
    ]
    for keys, ok, what in checks:
        if key in keys and not ok(value):
            return f"{key}: must be {what}, got {value!r}"
    if key in ENUMS and value not in ENUMS[key]:
        return f"{key}: must be one of {sorted(ENUMS[key])}, got {value!r}"
    return None


def render_templates(value: Any, problems: list[str]) -> Any:
    """``value`` with ghz's ``{{.Name}}`` actions replaced by sample values; an action ghz
    would not know becomes a problem."""
    if isinstance(value, dict):
        return {k: render_templates(v, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [render_templates(v, problems) for v in value]
    if not isinstance(value, str):
        return value

    def sample(match: re.Match[str]) -> str:
        name = match[1].strip()
        if name in TEMPLATE_FUNCTIONS:
            return TEMPLATE_FUNCTIONS[name]
        name = name.removeprefix(".")
        if name not in TEMPLATE_SAMPLES:
            problems.append(f"data: unknown template action {match[0]!r}")
            return ""
        return TEMPLATE_SAMPLES[name]

    return _TEMPLATE.sub(sample, value)


def _call_problems(config: dict[str, Any]) -> list[str]:
    """The call names a DecisionService method; data is a valid request for it."""
    call = config.get("call")
    if not isinstance(call, str):
        return []  # reported as missing or mistyped already
    service_name, sep, method_name = call.replace("/", ".").rpartition(".")
    if not sep:
        return [f"call: {call!r} is not 'package.Service.Method'"]
    services = {s.full_name: s for s in decision_pb2.DESCRIPTOR.services_by_name.values()}
    service = services.get(service_name)
    if service is None:
        return [f"call: no service {service_name!r} in decision.proto"]
    method = service.methods_by_name.get(method_name)
    if method is None:
        return [f"call: {service_name} has no method {method_name!r}"]
    if DATA_KEY not in config:
        return ["data: missing (every scenario sends a request body)"]
    problems: list[str] = []
    data = render_templates(config[DATA_KEY], problems)
    if not isinstance(data, dict):
        # ghz accepts a list for streaming calls; ours send one message template.
        return [*problems, f"data: must be one object for {method_name}"]
    request = message_factory.GetMessageClass(method.input_type)()
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as exc:
        return [*problems, f"data: not a {method.input_type.full_name}: {exc}"]
    if isinstance(request, decision_pb2.DecideStreamRequest):
        if method.client_streaming and not config.get("stream-dynamic-messages"):
            problems.append("stream-dynamic-messages: true, or every message has one id")
        request = request.request
    if isinstance(request, decision_pb2.DecideRequest):
        try:
            order_from_pb(request)
        except InvalidArgument as exc:
            problems.append(f"data: the server would reject it: {exc}")
    return problems


def ghz_config_problems(config: dict[str, Any]) -> list[str]:
    """Everything wrong with one parsed config file; empty when ghz would run it as meant."""
    problems = [f"{key}: not a ghz config option" for key in config if key not in GHZ_CONFIG_KEYS]
    for key, value in config.items():
        problem = _type_problem(key, value)
        if problem:
            problems.append(problem)
    for key in ("call", "host", "insecure", "duration"):
        if key not in config:
            problems.append(f"{key}: required")
    problems += [
        f"{key}: the configs use server reflection, not proto files"
        for key in sorted(REFLECTION_EXCLUDES & config.keys())
    ]
    if config.get("insecure") is not True:
        problems.append("insecure: must be true (the local servers speak plaintext)")
    problems += [
        f"{key}: TLS option in a plaintext config" for key in sorted(TLS_KEYS & config.keys())
    ]
    host = config.get("host")
    if isinstance(host, str) and not is_loopback(host):
        problems.append(f"host: {host!r} is not loopback")
    schedule = config.get("load-schedule", "const")
    if schedule in ("step", "line") and not config.get("load-step"):
        problems.append(f"load-step: required and non-zero for load-schedule {schedule}")
    if schedule == "step" and "load-step-duration" not in config:
        problems.append("load-step-duration: required for load-schedule step")
    if schedule != "const" and "rps" in config:
        problems.append("rps: only applies to load-schedule const")
    return problems + _call_problems(config)


def load(name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((GHZ_DIR / f"{name}.json").read_text())
    return config


def test_one_config_per_scenario():
    assert {p.stem for p in GHZ_DIR.glob("*.json")} == SCENARIOS


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_config_is_valid_for_ghz_and_our_server(name):
    config = load(name)
    assert ghz_config_problems(config) == []
    assert config["host"] == "127.0.0.1:50051"
    assert config["name"] == name


def test_burst_steps_the_load():
    config = load("burst")
    assert config["load-schedule"] == "step"
    assert config["load-end"] > config["load-start"] > 0
    assert config["load-step"] > 0


def test_stale_features_asks_about_a_symbol_the_local_stack_does_not_feed():
    assert load("stale-features")["data"]["symbol"] not in FED_SYMBOLS


def test_primary_failure_names_its_fault_injection():
    assert "decisionctl breaker primary force-open" in load("primary-failure")["tags"]["fault"]


def _set(key: str, value: object) -> Any:
    def change(config: dict[str, Any]) -> None:
        config[key] = value

    return change


def _drop(key: str) -> Any:
    return lambda config: config.pop(key)


def _data(**fields: object) -> Any:
    return lambda config: config["data"].update(fields)


# Each mutation of a valid config must be caught, and the problem must name the key.
MUTATIONS = [
    ("concurency", _set("concurency", 8)),  # misspelt: ghz would silently ignore it
    ("load_schedule", _set("load_schedule", "step")),
    ("duration", _set("duration", 60)),
    ("duration", _set("duration", "60 seconds")),
    ("timeout", _set("timeout", "")),
    ("concurrency", _set("concurrency", True)),
    ("total", _set("total", -1)),
    ("rps", _set("rps", 1.5)),
    ("tags", _set("tags", {"n": 1})),
    ("format", _set("format", "yaml")),
    ("proto", _set("proto", "proto/decision/v1/decision.proto")),
    ("protoset", _set("protoset", "bundle.protoset")),
    ("insecure", _set("insecure", False)),
    ("insecure", _drop("insecure")),
    ("cacert", _set("cacert", "ca.pem")),
    ("host", _set("host", "10.1.2.3:50051")),
    ("host", _drop("host")),
    ("duration", _drop("duration")),
    ("call", _set("call", "decision.v1.DecisionService.Decid")),
    ("call", _set("call", "decision.v1.AdminService.GetStatus")),
    ("call", _drop("call")),
    ("data", _drop("data")),
    ("data", _data(sid="SIDE_BUY")),
    ("data", _data(side="BUY")),
    ("data", _data(quantity=-1)),
    ("data", _data(symbol="btc usd")),
    ("data", _data(requestId="{{.RequestNum}}")),
    ("data", _data(requestId="{{randomString 8}}")),
    ("load-step", _set("load-schedule", "step")),
]


@pytest.mark.parametrize(
    ("key", "mutate"), MUTATIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(MUTATIONS)]
)
def test_a_wrong_config_is_caught(key, mutate):
    config = copy.deepcopy(load("steady"))
    mutate(config)
    problems = ghz_config_problems(config)
    assert any(p.startswith(f"{key}:") for p in problems), problems


def test_duration_grammar_follows_go():
    for good in ("10s", "500ms", "1m30s", "1.5h", "250us"):
        assert go_duration_ok(good), good
    for bad in ("10", "10 s", "ten seconds", "-5s", "s", 10):
        assert not go_duration_ok(bad), bad


@pytest.mark.parametrize(
    ("key", "mutate"),
    [
        ("load-step-duration", _drop("load-step-duration")),
        ("load-step-duration", _set("load-step-duration", 5)),
        ("load-step", _set("load-step", 0)),
        ("load-step", _set("load-step", 1.5)),
        ("load-schedule", _set("load-schedule", "steps")),
        ("rps", _set("rps", 100)),
    ],
)
def test_a_wrong_load_schedule_is_caught(key, mutate):
    config = copy.deepcopy(load("burst"))
    mutate(config)
    problems = ghz_config_problems(config)
    assert any(p.startswith(f"{key}:") for p in problems), problems
