"""Recorded sources as the replayer reads them: KIND:PATH, folders, several files in
receive-time order, malformed lines counted and skipped, and each venue's format read
back to the stream it was written from (the features match)."""

from __future__ import annotations

from pathlib import Path

import pytest

from feature_cache.events import MarketEvent
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.sources import Source
from feature_cache.features import compute_offline, same_features
from feature_cache.generator import MarketGenerator
from tests.feature_cache.recordings import write_binance, write_csv, write_kraken

VENUE_KEYS = {"binance": "BINANCE", "kraken": "KRAKEN", "csv": "COINBASE"}


def generated(count: int = 600) -> list[MarketEvent]:
    generator = MarketGenerator(["BTC-USD", "ETH-USD"], seed=5, start_time_us=1_700_000_000_000_000)
    return list(generator.events(count))


def write(kind: str, folder: Path, events: list[MarketEvent]) -> Path:
    if kind == "binance":
        write_binance(folder, events)
    elif kind == "kraken":
        write_kraken(folder / "KRAKEN.ws.1.0", events)
    else:
        write_csv(folder, events)
    return folder


@pytest.mark.parametrize("kind", ["binance", "kraken", "csv"])
def test_a_venue_recording_reads_back_to_the_features_it_was_written_from(kind, tmp_path) -> None:
    events = generated()
    summary = ReplaySummary()
    read = list(Source.parse(f"{kind}:{write(kind, tmp_path, events)}").events(summary))
    want = compute_offline(events)
    got = compute_offline(read)
    assert sorted(got) == sorted(f"{VENUE_KEYS[kind]}:{symbol}" for symbol in want)
    for symbol, values in want.items():
        assert same_features(got[f"{VENUE_KEYS[kind]}:{symbol}"], values), symbol
    assert summary.malformed == 0
    counts = summary.symbols[f"{VENUE_KEYS[kind]}:BTC-USD"]
    assert (counts.snapshots, counts.gaps, counts.checksum_failures, counts.dropped) == (1, 0, 0, 0)


def test_snapshots_recorded_apart_from_the_frames_are_read_in_receive_time_order(tmp_path) -> None:
    write_binance(tmp_path, generated())
    events = list(Source.parse(f"binance:{tmp_path}").events(ReplaySummary()))
    assert type(events[0]).__name__ == "BookSnapshot"  # the http file's first line
    assert {e.symbol for e in events} == {"BINANCE:BTC-USD", "BINANCE:ETH-USD"}


def test_a_malformed_line_is_counted_and_skipped_never_fatal(tmp_path) -> None:
    path = tmp_path / "KRAKEN.ws.1.0"
    write_kraken(path, generated(50))
    lines = path.read_text().splitlines()
    lines[5:5] = ['1700000000.1: [42, {"a": [["x", "1", "1.0"]]}', "garbage", ""]
    path.write_text("\n".join(lines) + "\n")
    summary = ReplaySummary()
    events = list(Source.parse(f"kraken:{path}").events(summary))
    assert len(events) == 50
    assert summary.malformed == 2
    assert summary.malformed_examples[0].startswith("KRAKEN.ws.1.0:6: bad JSON")
    assert summary.skipped["blank"] == 1
    assert "malformed 2" in summary.table()


def test_a_folder_gives_only_its_venue_s_files(tmp_path) -> None:
    write_binance(tmp_path, generated(20))
    (tmp_path / "README.md").write_text("# notes\n")
    (tmp_path / "BINANCE_FUTURES.ws.1.0").write_text("not this venue\n")
    assert [p.name for p in Source.parse(f"binance:{tmp_path}").files()] == [
        "BINANCE.http.0.0",
        "BINANCE.ws.1.0",
    ]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("bitmex:/tmp", "KIND:PATH with KIND one of coinbase, binance, kraken, csv"),
        ("binance", "KIND:PATH"),
        ("kraken:/no/such/folder", "no kraken recording at /no/such/folder"),
    ],
)
def test_a_bad_source_says_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Source.parse(spec)
