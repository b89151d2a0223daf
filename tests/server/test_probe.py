"""decision-probe, the image's health check and the TLS pods' Kubernetes probe, against a
real server."""

from __future__ import annotations

import asyncio

import pytest

from core.processes import free_port
from server import probe
from server.app import DecisionApp

pytestmark = pytest.mark.integration


async def test_serving_server_passes_and_anything_else_fails(start_app, capsys) -> None:
    app: DecisionApp = await start_app()
    address = f"127.0.0.1:{app.port}"
    assert await asyncio.to_thread(probe.main, [address]) == 0
    service = ["--service", "decision.v1.DecisionService"]
    assert await asyncio.to_thread(probe.main, [*service, address]) == 0

    capsys.readouterr()
    assert await asyncio.to_thread(probe.main, ["--service", "no.such.Service", address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    nothing = f"127.0.0.1:{free_port()}"
    assert await asyncio.to_thread(probe.main, ["--timeout-s", "0.5", nothing]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err

    await app.front.set_serving(False)
    assert await asyncio.to_thread(probe.main, [*service, address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
