"""The soak's held lever against a real decision server process: engaged, every look
sees it obeyed; released (or never engaged), a look says what the server does instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from localstack.levers import HELD_SCOPE, HeldLever
from tests.server.admin.test_control_state_processes import Server
from tests.server.conftest import OPERATOR_TOKEN, VIEWER_TOKEN

pytestmark = pytest.mark.integration


def test_a_held_lever_is_seen_obeyed_and_a_released_one_is_reported(
    redis_instance, key_prefix: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "admin"
    tokens.mkdir()
    (tokens / "operator.token").write_text(OPERATOR_TOKEN + "\n")
    (tokens / "viewer.token").write_text(VIEWER_TOKEN + "\n")
    server = Server(
        0, redis_instance.url, f"sqlite:///{tmp_path / 'audit.db'}", key_prefix, tmp_path
    )
    try:
        server.wait_serving()
        lever = HeldLever("127.0.0.1", server.port, server.admin_port, tokens)
        assert "lists kill switches []" in lever.lost()
        lever.engage(hold_s=600)
        assert lever.lost() == ""
        decided = server.decide(HELD_SCOPE)
        assert "kill switch" in decided.reason and "soak: must hold" in decided.reason
        lever.release()
        assert "lists kill switches []" in lever.lost()
    finally:
        server.proc.stop()
    lever.release()  # no server: it would expire by itself, and nothing is raised
