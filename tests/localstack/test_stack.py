"""A stack of some parts (a bench's backends) starts those and listens only on theirs."""

from __future__ import annotations

import pytest
import redis

from core.processes import port_open
from localstack.stack import PARTS, LocalStack, started


def test_a_stack_of_some_parts_claims_only_their_ports(tmp_path) -> None:
    stack = LocalStack(tmp_path, 1000, parts=("redis", "primary"))
    assert stack.ports() == [stack.redis_port, *vars(stack.primary).values()]
    assert set(LocalStack(tmp_path, 1000).ports()) > set(stack.ports())  # PARTS: all


def test_an_unknown_part_is_refused_with_the_known_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'redis-server'.*each one of") as caught:
        LocalStack(tmp_path, 1000, parts=("redis-server",))
    assert all(part in str(caught.value) for part in PARTS)


@pytest.mark.integration
def test_started_runs_the_parts_asked_for_and_stops_them(tmp_path) -> None:
    with started(tmp_path, ("redis",)) as stack:
        assert list(stack.processes) == ["redis-server"]
        assert redis.Redis(port=stack.redis_port).ping()
        assert not port_open("127.0.0.1", stack.decision_port)
    assert not port_open("127.0.0.1", stack.redis_port)
    assert not stack.processes["redis-server"].running()
