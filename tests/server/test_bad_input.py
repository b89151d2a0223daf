"""1,000 generated malformed or edge-case requests: only OK or INVALID_ARGUMENT, never down."""

from __future__ import annotations

import math
import random
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from decision_client.v1 import decision_pb2
from feature_cache.schema import FEATURE_NAMES
from server import validation
from server.errors import MAX_VIOLATIONS
from tests.server.conftest import (
    buy,
    decision_stub,
    replica_settings,
    sample_record,
    status_details,
)

pytestmark = pytest.mark.integration

SYMBOLS = [
    "BTC-USD", "", " ", "btc-usd", "X" * 33, "X" * 32, "BTC USD", "BTC\x00", "₿TC", "-BTC",
    "A", "BTC/USD", "ETH.USD_1", "\n", "BTC-USD\n", "0", "DROP TABLE", "X" * 10_000,
]  # fmt: skip
NUMBERS = [1.0, 0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -3.5e38, 3.4e38, 5e-324,
           1e-9, 123.456]  # fmt: skip
SIDES = [0, 1, 2, 3, -1, 2**31 - 1]
IDS = ["", "r-1", "x" * 128, "x" * 129, "tab\tid", "ünïcödé", "\x07bell", "😀" * 40]


def generated_request(rng: random.Random) -> decision_pb2.DecideRequest:
    request = decision_pb2.DecideRequest(
        symbol=rng.choice(SYMBOLS),
        side=rng.choice(SIDES),  # type: ignore[arg-type]
        quantity=rng.choice(NUMBERS),
        request_id=rng.choice(IDS),
        client_id=rng.choice(IDS),
    )
    if rng.random() < 0.3:
        request.limit_price = rng.choice(NUMBERS)
    for _ in range(rng.choice([0, 0, 1, 3])):
        name = rng.choice([*FEATURE_NAMES, "unknown", "", "spread", "x" * 300])
        request.feature_overrides[name] = rng.choice(NUMBERS)
    return request


@pytest.mark.timed
async def test_generated_bad_requests_get_ok_or_invalid_argument(
    replicas, start_app, channel_to, feature_writer, monkeypatch
):
    await feature_writer.write_many([sample_record("BTC-USD")])
    monkeypatch.setattr(validation, "MAX_BATCH_REQUESTS", 8)  # batches of 9 are too many
    # Real replicas: requests that pass validation go all the way to the model.
    app = await start_app(
        torchserve=replica_settings(replicas),
    )
    channel = channel_to(app)
    stub = decision_stub(channel)
    rng = random.Random(20261121)
    codes: dict[grpc.StatusCode, int] = {}

    for i in range(1000):
        try:
            if i % 10 == 9:
                size = rng.choice([0, 1, 8, 9])
                batch = [generated_request(rng) for _ in range(size)]
                await stub.DecideBatch(decision_pb2.DecideBatchRequest(requests=batch), timeout=2.0)
            else:
                await stub.Decide(generated_request(rng), timeout=2.0)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            field = (exc.details() or "").split(":", 1)[0]
            assert field.split(".")[-1].split("[")[0] in {
                "symbol", "side", "quantity", "limit_price", "feature_overrides",
                "request_id", "client_id", "requests",
            }, exc.details()  # fmt: skip
        codes[code] = codes.get(code, 0) + 1

    assert codes.get(grpc.StatusCode.OK, 0) > 0
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 500
    await feature_writer.write_many([sample_record("BTC-USD", offset=2)])
    response = await stub.Decide(buy(), timeout=2.0)  # still serving, from the model
    assert response.source == decision_pb2.SOURCE_PRIMARY, response.reason
    assert [r.breaker.state for r in app.replicas] == ["closed", "closed"]


async def test_feature_record_the_model_cannot_take_goes_down_the_ladder(
    start_app, channel_to, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD", ofi_1s=1e39)])
    app = await start_app()
    response = await decision_stub(channel_to(app)).Decide(buy(), timeout=2.0)
    assert response.source == decision_pb2.SOURCE_ABSTAIN
    assert response.reason.startswith("features unusable: ofi_1s=1e+39")


async def test_bytes_that_are_not_a_request_get_invalid_argument(start_app, channel_to):
    app = await start_app()
    channel = channel_to(app)
    raw = channel.unary_unary("/decision.v1.DecisionService/Decide")
    rng = random.Random(7)
    for payload in [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", rng.randbytes(64), b"\x12"]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(payload, timeout=2.0)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "request: not a valid decision.v1.DecideRequest"


# Each request is valid but for one field; the field the status must name.
INVALID_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"symbol": ""}, "symbol"),
    ({"symbol": "btc-usd"}, "symbol"),
    ({"side": decision_pb2.SIDE_UNSPECIFIED}, "side"),
    ({"quantity": math.nan}, "quantity"),
    ({"quantity": 0.0}, "quantity"),
    ({"limit_price": -1.0}, "limit_price"),
    ({"feature_overrides": {"nope": 1.0}}, "feature_overrides['nope']"),
    ({"feature_overrides": {"spread_bps": math.inf}}, "feature_overrides['spread_bps']"),
    ({"feature_overrides": {"ofi_1s": 1e39}}, "feature_overrides['ofi_1s']"),
    ({"request_id": "x" * 129}, "request_id"),
]


async def test_each_invalid_field_is_named(start_app, channel_to):
    stub = decision_stub(channel_to(await start_app()))  # one app for every case
    answers = []
    for request_fields, field in INVALID_FIELDS:
        request = decision_pb2.DecideRequest(
            symbol="BTC-USD", side=decision_pb2.SIDE_BUY, quantity=1
        )
        for name, value in request_fields.items():
            if name == "feature_overrides":
                request.feature_overrides.update(value)
            else:
                setattr(request, name, value)
        try:
            await stub.Decide(request, timeout=2.0)
            answers.append((field, "OK", ""))
        except grpc.aio.AioRpcError as err:
            answers.append((field, err.code().name, (err.details() or "").split(": ", 1)[0]))
    assert answers == [(field, "INVALID_ARGUMENT", field) for _, field in INVALID_FIELDS]


async def test_oversized_batch_and_bad_batch_item_are_named(start_app, channel_to):
    app = await start_app()
    stub = decision_stub(channel_to(app))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecideBatch(decision_pb2.DecideBatchRequest(requests=[buy()] * 257), timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "requests: holds 257 requests; at most 256"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecideBatch(
            decision_pb2.DecideBatchRequest(requests=[buy(), buy(quantity=-2.0)]), timeout=2
        )
    assert (err.value.details() or "").startswith("requests[1].quantity: ")


def field_violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The ``google.rpc.BadRequest`` field violations in the call's status details, read
    as a client of gRPC would (grpcio-status)."""
    [detail] = status_details(err)
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    return [(v.field, v.description) for v in bad_request.field_violations]


async def test_every_bad_field_of_a_request_is_a_field_violation(start_app, channel_to):
    app = await start_app()
    stub = decision_stub(channel_to(app))
    request = decision_pb2.DecideRequest(symbol="btc", side=decision_pb2.SIDE_BUY, quantity=0.0)
    request.feature_overrides["nope"] = 1.0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Decide(request, timeout=2.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [field for field, _ in field_violations(err.value)]
    assert fields == ["symbol", "quantity", "feature_overrides['nope']"]
    assert err.value.details() == "; ".join(
        f"{field}: {problem}" for field, problem in field_violations(err.value)
    )


async def test_every_bad_request_of_a_batch_is_reported_with_its_index(start_app, channel_to):
    app = await start_app()
    stub = decision_stub(channel_to(app))
    bad = [
        buy(symbol=""),
        buy(quantity=math.nan),
        buy(side=decision_pb2.SIDE_UNSPECIFIED),
        buy(limit_price=-1.0),
        buy(request_id="x" * 129),
    ]
    batch = [bad[0], buy(), bad[1], bad[2], buy(), bad[3], bad[4]]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecideBatch(decision_pb2.DecideBatchRequest(requests=batch), timeout=2.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(err.value)] == [
        "requests[0].symbol",
        "requests[2].quantity",
        "requests[3].side",
        "requests[5].limit_price",
        "requests[6].request_id",
    ]
    assert app.engine.in_flight == 0 and sum(app.engine.decided.values()) == 0  # none decided


async def test_a_batch_of_many_bad_requests_gets_its_first_violations_and_a_count(
    start_app, channel_to
):
    """256 bad requests, each with long bad fields: the status still fits gRPC's trailing
    metadata, so the caller gets INVALID_ARGUMENT, not a transport error."""
    app = await start_app()
    stub = decision_stub(channel_to(app))
    bad = buy(symbol="x" * 10_000, quantity=math.nan, request_id="y" * 5_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DecideBatch(decision_pb2.DecideBatchRequest(requests=[bad] * 256), timeout=5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert len(violations) == MAX_VIOLATIONS
    assert violations[0][0] == "requests[0].symbol"
    assert (err.value.details() or "").endswith(f"; and {3 * 256 - MAX_VIOLATIONS} more")


async def test_corrupt_feature_record_reads_as_missing(
    start_app, channel_to, redis_client, key_prefix
):
    await redis_client.hset(f"{key_prefix}features:BTC-USD", "p", b"\xff{not json")
    await redis_client.set(f"{key_prefix}score:BTC-USD:buy", "[1, 2]")
    app = await start_app()
    response = await decision_stub(channel_to(app)).Decide(buy(), timeout=2.0)
    assert response.source == decision_pb2.SOURCE_ABSTAIN
    assert response.reason == (
        "no features for BTC-USD; no cached score; abstain: no fresh features for rules"
    )
