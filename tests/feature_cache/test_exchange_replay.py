"""A recording of each venue kind replayed through a real broker into Redis: the
features there equal the offline computation for every symbol."""

from __future__ import annotations

import pytest

from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.sources import Source
from feature_cache.generator import MarketGenerator
from feature_cache.store import FeatureReader
from tests.feature_cache.conftest import publish, wait_for_features
from tests.feature_cache.test_sources import write

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["binance", "kraken", "csv"])
async def test_a_venue_recording_replays_into_the_offline_features(
    kind, tmp_path, kafka_settings, start_consumer, redis_client, key_prefix
):
    generator = MarketGenerator(
        ["BTC-USD", "ETH-USD", "SOL-USD"], seed=9, start_time_us=1_700_000_000_000_000
    )
    folder = write(kind, tmp_path, list(generator.events(1500)))
    events = list(Source.parse(f"{kind}:{folder}").events(ReplaySummary()))
    assert len({e.symbol for e in events}) == 3
    await start_consumer()
    await publish(kafka_settings, events)
    await wait_for_features(FeatureReader(redis_client, key_prefix=key_prefix), events)
