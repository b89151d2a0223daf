from quality.history import MidHistory


def test_the_mid_in_effect_is_the_last_at_or_before_the_time() -> None:
    history = MidHistory()
    assert history.first_us is None and history.mid_at(5) is None
    history.note(10, 100.0)
    history.note(20, None)  # no touch: the mid in effect stays
    history.note(30, 101.0)
    history.note(30, 102.0)  # same time: the last one applied is the one in effect
    assert history.first_us == 10
    assert history.seen_until_us == 30
    assert [history.mid_at(t) for t in (9, 10, 25, 30, 99)] == [None, 100.0, 100.0, 102.0, 102.0]


def test_unchanged_mids_and_late_events_add_no_points() -> None:
    history = MidHistory()
    history.note(10, 100.0)
    history.note(20, 100.0)
    assert len(history) == 1
    assert history.seen_until_us == 20
    history.note(15, 90.0)  # older than what was seen: ignored
    assert history.mid_at(15) == 100.0
    assert history.seen_until_us == 20


def test_pruning_keeps_the_point_in_effect_at_the_bound() -> None:
    history = MidHistory()
    for t in range(0, 5000, 10):
        history.note(t, float(t))
    history.prune(2505)
    assert history.first_us == 2500
    assert history.mid_at(2505) == 2500.0
    assert history.mid_at(2499) is None
    assert history.mid_at(4990) == 4990.0
    history.prune(100)  # never back
    assert history.first_us == 2500
