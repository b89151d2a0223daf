"""The overlays rendered once per session by real kustomize."""

from __future__ import annotations

import pytest

from k8s.render import OVERLAYS, Object, render_overlay


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Object]]:
    return {overlay: render_overlay(overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest, rendered: dict[str, list[Object]]) -> list[Object]:
    """Each overlay's objects in turn."""
    return rendered[request.param]
