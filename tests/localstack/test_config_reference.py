"""The configuration the docs promise is the code's: the generated reference is current, and
every ``DECISION_*`` variable the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localstack.config_reference import REFERENCE, render, settings

REPO = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"DECISION_[A-Z0-9_]+?__[A-Z0-9_]+")
BY_NAME = {s.variable: s for s in settings()}


def _documents() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "k8s").rglob("*.yaml")),
    ]


def test_the_reference_is_generated_from_the_current_settings() -> None:
    assert REFERENCE.read_text() == render(), "run make config-doc"


def test_the_reference_lists_a_known_setting_with_its_default_and_processes() -> None:
    redis_url = BY_NAME["DECISION_REDIS__URL"]
    assert redis_url.default == "redis://127.0.0.1:16379/0"
    assert set(redis_url.processes) == {"decision-server", "feature-cache", "labeler"}
    assert BY_NAME["DECISION_SERVER__PORT"].processes == ("decision-server",)
    assert "| `DECISION_SERVER__PORT` | 50051 | decision-server |" in render()


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_variable_a_document_names_is_a_setting(document: Path) -> None:
    named = set(VARIABLE.findall(document.read_text()))
    unknown = sorted(named - BY_NAME.keys())
    assert not unknown, f"{document.name} names settings that do not exist: {unknown}"
