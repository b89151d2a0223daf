"""``judge``: what a server makes of Redis's copy of the control state (pure logic)."""

from __future__ import annotations

import pytest

from server.control.durable import StoredState
from server.control.redis_copy import Copy, Verdict, judge
from server.control.state import Change, Entry

KILL = {"kill:SOL-USD": Entry(True, Change("oncall", "halt", 1))}
MINE = StoredState(5, KILL)


def copy_at(version: int | None, entries: dict[str, Entry] = KILL) -> Copy:
    return Copy("" if version is None else str(version), version, entries if version else {})


@pytest.mark.parametrize(
    ("copy", "redis_seen", "first_look", "against_store", "expected"),
    [
        (copy_at(5), 5, False, True, Verdict(in_step=True)),
        # Behind: a change Redis has not taken yet is written, not counted.
        (copy_at(4), 4, False, True, Verdict(repair=True)),
        # Gone back past what this server saw there: a failover that lost writes.
        (copy_at(3), 5, False, True, Verdict(repair=True, loss="went back from version 5 to 3")),
        # Emptied after holding a state, or found empty by a server starting now.
        (copy_at(None), 5, False, True, Verdict(repair=True, loss="held no control state")),
        (copy_at(None), 0, True, True, Verdict(repair=True, loss="held no control state")),
        # Empty before the fleet's first change reached it: written, not counted.
        (copy_at(None), 0, False, True, Verdict(repair=True)),
        # Above the store (read after it): never a change.
        (copy_at(9), 5, False, True, Verdict(repair=True, loss="which the audit store does not")),
        # Above what this server read, the store not read this time: read again first.
        (copy_at(9), 5, False, False, Verdict()),
        # The same version with other entries.
        (copy_at(5, {}), 5, False, True, Verdict(repair=True, loss="changed without a change")),
        (Copy("x", None, {}, unreadable="bad"), 5, False, True, Verdict(repair=True, loss="bad")),
    ],
)
def test_judge(
    copy: Copy, redis_seen: int, first_look: bool, against_store: bool, expected: Verdict
) -> None:
    verdict = judge(
        copy, MINE, redis_seen=redis_seen, first_look=first_look, against_store=against_store
    )
    assert (verdict.in_step, verdict.repair) == (expected.in_step, expected.repair)
    assert bool(verdict.loss) == bool(expected.loss)
    assert expected.loss in verdict.loss


def test_nothing_set_and_nothing_in_redis_is_in_step() -> None:
    verdict = judge(
        copy_at(None), StoredState(0, {}), redis_seen=0, first_look=True, against_store=True
    )
    assert verdict == Verdict(in_step=True)
