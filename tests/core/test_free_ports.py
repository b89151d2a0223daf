"""Ports chosen for children: free, from their own range, never handed out twice."""

from __future__ import annotations

import socket

from core import processes
from core.processes import CHILD_PORTS, free_port, free_ports, outgoing_ports


def test_ports_are_distinct_free_and_clear_of_outgoing_connections() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(port in CHILD_PORTS and port not in outgoing_ports() for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if it was not free


def test_a_port_not_yet_bound_is_not_handed_out_again(monkeypatch) -> None:
    monkeypatch.setattr(processes, "_handed_out", set())  # others' ports stay handed out
    more_than_half = len(CHILD_PORTS) // 2 + 1
    first = set(free_ports(more_than_half))
    # None of these is bound, so two draws of more than half the range would meet but
    # for the record of what was handed out (a sibling chosen before the first binds).
    again = set(free_ports(more_than_half)) | {free_port() for _ in range(10)}
    assert len(again) == more_than_half + 10
    assert not first & again
