"""Decision ids (core/ids.py)."""

from __future__ import annotations

import time
import uuid

from core.ids import id_time_ms, new_decision_id


def test_a_decision_id_is_a_uuid7_that_says_when_it_was_made_and_sorts_by_it():
    before_ms = time.time_ns() // 1_000_000
    ids = [new_decision_id() for _ in range(1000)]
    after_ms = time.time_ns() // 1_000_000
    assert all(uuid.UUID(i).version == 7 and len(i) == 36 for i in ids)
    made = [id_time_ms(i) for i in ids]
    assert all(before_ms <= t <= after_ms for t in made if t is not None)
    assert len(set(ids)) == len(ids)
    assert [id_time_ms(i) for i in sorted(ids)] == sorted(made)  # type: ignore[type-var]


def test_other_ids_say_nothing_of_their_time():
    assert id_time_ms(str(uuid.uuid4())) is None
    assert id_time_ms("not-an-id") is None
    assert id_time_ms("") is None
