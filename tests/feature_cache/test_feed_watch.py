"""``FeedWatch``: a burst of re-deliveries is not an alarm; a symbol ignored for
``IGNORED_ALARM_S`` is, until one of its events applies again."""

from __future__ import annotations

from collections import Counter

from feature_cache.features import Applied
from feature_cache.feed_watch import IGNORED_ALARM_S, REPORT_INTERVAL_S, FeedWatch

T_US = 1_800_000_000_000_000


def ignored(*items: tuple[str, Applied, int]) -> Counter[tuple[str, Applied]]:
    return Counter({(symbol, reason): count for symbol, reason, count in items})


def test_a_symbol_ignored_for_the_alarm_span_is_reported_until_it_applies_again() -> None:
    watch = FeedWatch()
    watch.note([], ignored(("SKL-USD", Applied.DUPLICATE, 40)), now_s=100.0)
    watch.note(["BTC-USD"], ignored(("SKL-USD", Applied.DUPLICATE, 60)), now_s=105.0)
    assert watch.ignored(now_s=100.0 + IGNORED_ALARM_S - 0.1) == {}
    assert watch.report(100.0 + IGNORED_ALARM_S - 0.1, T_US) is None
    late = 100.0 + IGNORED_ALARM_S
    assert list(watch.ignored(late)) == ["SKL-USD"]
    feeds, resumed = watch.report(late, T_US) or ([], [])
    assert resumed == []
    [feed] = feeds
    assert (feed.symbol, feed.events, feed.reason) == ("SKL-USD", 100, "duplicate")
    assert feed.since_us == T_US - int(IGNORED_ALARM_S * 1e6)
    # Reported again only every REPORT_INTERVAL_S while it lasts.
    assert watch.report(late + 0.5, T_US) is None
    assert watch.report(late + REPORT_INTERVAL_S, T_US) is not None
    # One applied event: live again, and the report clears it at once.
    watch.note(["SKL-USD"], ignored(("SKL-USD", Applied.DUPLICATE, 3)), now_s=late + 3)
    assert watch.ignored(late + 3) == {}
    assert watch.report(late + 3, T_US) == ([], ["SKL-USD"])
    assert watch.report(late + 30, T_US) is None


def test_a_burst_of_re_deliveries_then_applied_events_raises_nothing() -> None:
    watch = FeedWatch()
    watch.note([], ignored(("BTC-USD", Applied.DUPLICATE, 500)), now_s=0.0)
    watch.note(["BTC-USD"], Counter(), now_s=0.5)
    assert watch.ignored(now_s=60.0) == {}
    assert watch.report(60.0, T_US) is None


def test_a_revoked_partitions_symbols_are_forgotten() -> None:
    watch = FeedWatch()
    watch.note([], ignored(("ETH-USD", Applied.OLD_SESSION, 1)), now_s=0.0)
    watch.forget(["ETH-USD"])
    assert watch.ignored(now_s=IGNORED_ALARM_S * 2) == {}
