"""Coinbase recording parser: hand-written messages in the recording's line format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from feature_cache.coinbase import CoinbaseParser, RecordingFormatError, read_recording
from feature_cache.events import Aggressor, BookDelta, BookSide, BookSnapshot, Trade

# 2021-01-02T03:04:05.678901Z in microseconds since the epoch, worked out by hand:
# 2021-01-01T00:00:00Z is 1_609_459_200 s; + 1 day 3 h 4 min 5 s = 97_445 s.
T_ISO = "2021-01-02T03:04:05.678901Z"
T_US = (1_609_459_200 + 97_445) * 1_000_000 + 678_901


def line(message: dict[str, object], receive_time: str = "1609556645.7") -> str:
    return f"{receive_time}: {json.dumps(message)}\n"


def snapshot(product: str = "AAA-USD") -> dict[str, object]:
    return {
        "type": "snapshot",
        "product_id": product,
        "bids": [["10.50", "1.25"], ["10.40", "3"]],
        "asks": [["10.60", "0.5"]],
    }


def l2update(product: str = "AAA-USD", changes: list[list[str]] | None = None) -> dict[str, object]:
    return {
        "type": "l2update",
        "product_id": product,
        "changes": changes if changes is not None else [["buy", "10.50", "2.5"]],
        "time": T_ISO,
    }


def match(product: str = "AAA-USD", side: str = "sell", sequence: int = 500) -> dict[str, object]:
    return {
        "type": "match",
        "trade_id": 7,
        "maker_order_id": "m",
        "taker_order_id": "t",
        "side": side,
        "size": "0.75",
        "price": "10.55",
        "product_id": product,
        "sequence": sequence,
        "time": T_ISO,
    }


def test_snapshot_converts_levels_and_takes_receive_time() -> None:
    event = CoinbaseParser().parse(line(snapshot(), receive_time="1609556645.1234567"))

    assert event == BookSnapshot(
        symbol="AAA-USD",
        # Seven decimals round to the nearest microsecond, exactly (no float error).
        exchange_time_us=1_609_556_645_123_457,
        sequence=1,
        bids=((10.5, 1.25), (10.4, 3.0)),
        asks=((10.6, 0.5),),
    )


def test_l2update_maps_sides_and_zero_size_removes() -> None:
    changes = [["buy", "10.50", "2.5"], ["sell", "10.60", "0"], ["sell", "10.70", "0.0"]]

    event = CoinbaseParser().parse(line(l2update(changes=changes)))

    assert event == BookDelta(
        symbol="AAA-USD",
        exchange_time_us=T_US,
        sequence=1,
        changes=(
            (BookSide.BID, 10.5, 2.5),
            (BookSide.ASK, 10.6, 0.0),
            (BookSide.ASK, 10.7, 0.0),
        ),
    )


@pytest.mark.parametrize(
    ("maker_side", "aggressor"),
    # Coinbase's side is the maker's: a resting sell was lifted by a buyer, and vice versa.
    [("sell", Aggressor.BUY), ("buy", Aggressor.SELL)],
)
def test_match_aggressor_is_the_opposite_of_the_maker_side(
    maker_side: str, aggressor: Aggressor
) -> None:
    event = CoinbaseParser().parse(line(match(side=maker_side)))

    assert event == Trade(
        symbol="AAA-USD",
        exchange_time_us=T_US,
        sequence=1,
        price=10.55,
        size=0.75,
        aggressor=aggressor,
    )


@pytest.mark.parametrize(
    ("iso", "expected_us"),
    [
        ("1970-01-01T00:00:00.000001Z", 1),
        ("2021-01-02T03:04:05Z", T_US - 678_901),
        ("2021-01-02T03:04:05.5Z", T_US - 678_901 + 500_000),
        ("2021-01-02T05:04:05.678901+02:00", T_US),
    ],
)
def test_time_parses_to_exact_utc_microseconds(iso: str, expected_us: int) -> None:
    message = l2update()
    message["time"] = iso

    event = CoinbaseParser().parse(line(message))

    assert isinstance(event, BookDelta)
    assert event.exchange_time_us == expected_us


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("wss://ws-feed.example.com <-> 1609556640.5\n", "connection"),
        ('wss://ws-feed.example.com <- 1609556640.6: {"type":"subscribe"}\n', "connection"),
        ("\n", "blank"),
        ("   \r\n", "blank"),
        (line({"type": "subscriptions", "channels": []}), "subscriptions"),
        (line({"type": "heartbeat", "product_id": "AAA-USD", "sequence": 1}), "heartbeat"),
        (line({"type": "ticker", "product_id": "AAA-USD", "price": "1"}), "ticker"),
        # last_match is the trade before the subscription: skipped, not a Trade.
        (line({**match(), "type": "last_match"}), "last_match"),
    ],
)
def test_non_market_lines_are_skipped_and_counted(text: str, kind: str) -> None:
    parser = CoinbaseParser()

    assert parser.parse(text) is None
    assert parser.stats.skipped == {kind: 1}
    assert not parser.stats.events


def test_sequences_strictly_increase_per_product_across_types() -> None:
    parser = CoinbaseParser()
    # Exchange sequences that would break a mix of exchange and own numbering.
    messages: list[dict[str, object]] = [
        snapshot("AAA-USD"),
        match("AAA-USD", sequence=900),
        l2update("AAA-USD"),
        snapshot("BBB-USD"),
        l2update("BBB-USD"),
        match("AAA-USD", sequence=901),
        {"type": "ticker", "product_id": "AAA-USD"},
        match("BBB-USD", sequence=5),
        l2update("AAA-USD"),
    ]

    events = [e for e in (parser.parse(line(m)) for m in messages) if e is not None]

    assert [(e.symbol, e.sequence) for e in events] == [
        ("AAA-USD", 1),
        ("AAA-USD", 2),
        ("AAA-USD", 3),
        ("BBB-USD", 1),
        ("BBB-USD", 2),
        ("AAA-USD", 4),
        ("BBB-USD", 3),
        ("AAA-USD", 5),
    ]


MALFORMED = [
    pytest.param('1609556645.7: {"type": "l2update", "product_id"', id="bad-json"),
    pytest.param("1609556645.7: [1, 2]", id="not-an-object"),
    pytest.param("not a recording line", id="no-receive-time"),
    pytest.param('yesterday: {"type": "snapshot"}', id="bad-receive-time"),
    pytest.param(line({"product_id": "AAA-USD"}), id="no-type"),
    pytest.param(line({k: v for k, v in l2update().items() if k != "time"}), id="no-time"),
    pytest.param(line({**l2update(), "time": "2021-01-02T03:04:05"}), id="naive-time"),
    pytest.param(line({**l2update(), "time": "noon"}), id="bad-time"),
    pytest.param(line(l2update(changes=[["bid", "1", "1"]])), id="bad-change-side"),
    pytest.param(line(l2update(changes=[["buy", "1"]])), id="short-change"),
    pytest.param(line(l2update(changes=[])), id="no-changes"),
    pytest.param(line(l2update(changes=[["buy", "abc", "1"]])), id="bad-price"),
    pytest.param(line(l2update(changes=[["buy", "1", "-1"]])), id="negative-size"),
    pytest.param(line(l2update(changes=[["buy", "nan", "1"]])), id="nan-price"),
    pytest.param(line({**match(), "side": "up"}), id="bad-match-side"),
    pytest.param(line({k: v for k, v in match().items() if k != "price"}), id="no-price"),
    pytest.param(line({**match(), "size": 0.75}), id="number-not-string"),
    pytest.param(line({k: v for k, v in snapshot().items() if k != "asks"}), id="no-asks"),
    pytest.param(line({**snapshot(), "bids": [["1", "2", "3"]]}), id="bad-level"),
    pytest.param(line({k: v for k, v in snapshot().items() if k != "product_id"}), id="no-id"),
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_line_raises_with_its_line_number(bad: str) -> None:
    parser = CoinbaseParser()
    assert parser.parse(line(snapshot())) is not None
    assert parser.parse("\n") is None

    with pytest.raises(RecordingFormatError) as caught:
        parser.parse(bad)

    assert caught.value.line_number == 3
    assert caught.value.reason
    assert str(caught.value).startswith("line 3: ")


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "recording"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_read_recording_streams_events_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            "wss://ws-feed.example.com <-> 1609556640.5\n",
            line({"type": "subscriptions", "channels": []}),
            line(snapshot()),
            line(l2update()),
            line(match()),
            "\n",
        ],
    )
    parser = CoinbaseParser()

    events = list(read_recording(path, parser=parser))

    assert [type(e) for e in events] == [BookSnapshot, BookDelta, Trade]
    assert parser.stats.lines == 6
    assert parser.stats.events == {"BookSnapshot": 1, "BookDelta": 1, "Trade": 1}
    assert parser.stats.skipped == {"connection": 1, "subscriptions": 1, "blank": 1}
    assert parser.stats.malformed == 0


def test_read_recording_raises_on_the_first_malformed_line(tmp_path: Path) -> None:
    path = write(tmp_path, [line(snapshot()), "1609556645.7: {oops\n", line(l2update())])

    events = read_recording(path)

    assert isinstance(next(events), BookSnapshot)
    with pytest.raises(RecordingFormatError) as caught:
        next(events)
    assert caught.value.line_number == 2


def test_read_recording_can_count_and_skip_malformed_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            line(snapshot()),
            "1609556645.7: {oops\n",
            line(l2update(changes=[["bid", "1", "1"]])),
            line(l2update()),
        ],
    )
    parser = CoinbaseParser()

    events = list(read_recording(path, skip_malformed=True, parser=parser))

    # The skipped lines take no sequence number: the delta follows the snapshot directly.
    assert [(type(e), e.sequence) for e in events] == [(BookSnapshot, 1), (BookDelta, 2)]
    assert parser.stats.malformed == 2
    assert parser.stats.lines == 4
