"""A second stack's port offset (tests, the soak) keeps clear of the ports the kernel
gives outgoing connections and of a stack on the default ports."""

from __future__ import annotations

import pytest

from core.processes import CHILD_PORTS
from localstack import stack as localstack
from localstack.__main__ import _usage
from localstack.stack import LocalStack

# Linux's default net.ipv4.ip_local_port_range.
LINUX_OUTGOING = range(32768, 61000)


@pytest.mark.parametrize("options", [{}, {"prometheus": True, "workers": 4}])
def test_an_offset_stack_takes_no_port_of_outgoing_connections(tmp_path, monkeypatch, options):
    monkeypatch.setattr(localstack, "outgoing_ports", lambda: LINUX_OUTGOING)
    default_ports = set(LocalStack(tmp_path, 0, **options).ports())
    for _ in range(20):  # the offset is drawn at random
        stack = LocalStack(tmp_path, LocalStack.free_offset(tmp_path, **options), **options)
        assert [port for port in stack.ports() if port in LINUX_OUTGOING] == []
        assert not default_ports & set(stack.ports())


def test_every_port_outgoing_still_gives_an_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(localstack, "outgoing_ports", lambda: range(1024, 65536))
    offset = LocalStack.free_offset(tmp_path)
    assert 1000 <= offset < 15000
    assert not LocalStack(tmp_path, offset).overlap_with_default()


@pytest.mark.parametrize("options", [{}, {"prometheus": True, "workers": 4}])
def test_no_stack_takes_a_port_from_the_range_tests_give_children(tmp_path, monkeypatch, options):
    monkeypatch.setattr(localstack, "outgoing_ports", lambda: LINUX_OUTGOING)
    assert not set(LocalStack(tmp_path, 0, **options).ports()) & set(CHILD_PORTS)
    for _ in range(20):
        stack = LocalStack(tmp_path, LocalStack.free_offset(tmp_path, **options), **options)
        assert not set(stack.ports()) & set(CHILD_PORTS)


def test_a_second_stack_s_banner_names_its_broker_and_how_to_replay_to_it(tmp_path):
    usage = _usage(LocalStack(tmp_path, 11000))
    assert "Market data: broker 127.0.0.1:30092 (topic market-data)" in usage
    # Without --bootstrap the replayer publishes to the default stack's broker (19092).
    assert (
        ".venv/bin/python -m feature_cache.replay --bootstrap 127.0.0.1:30092 "
        "--source KIND:PATH --speed 1"
    ) in usage
    assert "19092" not in usage


def test_the_default_stack_s_banner_names_its_broker_too(tmp_path):
    usage = _usage(LocalStack(tmp_path, 0))
    assert "Market data: broker 127.0.0.1:19092 (topic market-data)" in usage
    assert "feature_cache.replay --bootstrap 127.0.0.1:19092 " in usage
