"""Settings that would silently disable a safety mechanism are rejected at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import BaseModel, SecretStr, ValidationError, field_validator

from core.settings import SettingsSection, environment_lines, settings_problems
from server.settings import Settings
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"breaker": {"fail_max": 0}}, "breaker.fail_max"),
        ({"deadline": {"model_call_ms": 0}}, "deadline.model_call_ms"),
        ({"deadline": {"model_call_ms": 10}}, "hung replica would never open"),
        ({"deadline": {"default_budget_ms": 2}}, "deadline.default_budget_ms"),
        ({"deadline": {"store_read_ms": 0}}, "deadline.store_read_ms"),
        (
            {"torchserve": {"model_version": "archive"}},
            "reads the archives in drift.model_store, which is not set",
        ),
        ({"server": {"no_such_field": 1}}, "server.no_such_field"),
    ],
)
def test_unsafe_or_unknown_settings_are_rejected(sections, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        Settings(**sections)


def test_nested_environment_variables(monkeypatch):
    monkeypatch.setenv("DECISION_DEADLINE__MODEL_CALL_MS", "15")
    monkeypatch.setenv("DECISION_SERVER__PORT", "6000")
    settings = Settings()
    assert settings.deadline.model_call_ms == 15
    assert settings.server.port == 6000
    assert settings.torchserve.primary_address == "127.0.0.1:7070"


def test_printed_config_sets_the_same_settings_when_read_back(monkeypatch):
    monkeypatch.setenv("DECISION_REDIS__URL", "redis://cache.internal:6380/2")
    monkeypatch.setenv("DECISION_SERVER__MAX_CONCURRENT_STREAMS", "64")
    printed = environment_lines(Settings())
    assert "DECISION_REDIS__URL=redis://cache.internal:6380/2" in printed
    assert "DECISION_SERVER__MAX_CONCURRENT_STREAMS=64" in printed
    for line in printed:
        if line.startswith("#"):
            continue
        name, value = line.split("=", 1)
        monkeypatch.setenv(name, value)
    read_back = Settings()
    monkeypatch.delenv("DECISION_REDIS__URL")
    monkeypatch.delenv("DECISION_SERVER__MAX_CONCURRENT_STREAMS")
    assert read_back.redis.url == "redis://cache.internal:6380/2"
    assert read_back.server.max_concurrent_streams == 64
    assert read_back.model_dump() == {
        **Settings().model_dump(),
        "redis": {**Settings().redis.model_dump(), "url": "redis://cache.internal:6380/2"},
        "server": {**Settings().server.model_dump(), "max_concurrent_streams": 64},
    }


def test_secrets_are_masked_in_the_printed_config(monkeypatch):
    monkeypatch.setenv("DECISION_ADMIN__TOKENS", "oncall operator s3cret-token-value")
    monkeypatch.setenv(
        "DECISION_AUDIT__DATABASE_URL", "postgresql+psycopg://audit:pw-s3cret@db:5432/a"
    )
    monkeypatch.setenv("DECISION_REDIS__URL", "redis://:s3cret-pass@cache:6379/0")
    printed = "\n".join(environment_lines(Settings()))
    assert "s3cret" not in printed
    assert "DECISION_ADMIN__TOKENS=**********" in printed
    assert "DECISION_AUDIT__DATABASE_URL=postgresql+psycopg://audit:***@db:5432/a" in printed
    assert "DECISION_REDIS__URL=redis://:***@cache:6379/0" in printed


def run_module(env: dict[str, str], module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` with ``env``, as a shell would start it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_print_config_exits_without_serving_and_bad_values_name_the_field():
    env = {**os.environ, "DECISION_DECISION__THRESHOLD": "0.7"}
    done = run_module(env, "server", "--print-config")
    assert done.returncode == 0, done.stderr
    assert "DECISION_DECISION__THRESHOLD=0.7" in done.stdout.splitlines()
    env["DECISION_SERVER__PORT"] = "not-a-port"
    done = run_module(env, "server")
    assert done.returncode == 2
    assert done.stderr.startswith("decision-server: invalid settings:\n")
    assert "DECISION_SERVER__PORT='not-a-port': Input should be a valid integer" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("module", "program", "variable"),
    [
        ("feature_cache", "feature-cache", "DECISION_FEATURE_CACHE__METRICS_PORT"),
        ("quality", "decision-labeler", "DECISION_QUALITY__METRICS_PORT"),
        ("server", "decision-server", "DECISION_SERVER__METRICS_PORT"),
    ],
)
def test_every_process_names_the_variable_it_cannot_use(module, program, variable):
    env = {**os.environ, variable: "70000"}
    done = run_module(env, module)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"{program}: invalid settings:\n"
        f"  {variable}='70000': Input should be less than or equal to 65535\n"
    )


@pytest.mark.parametrize(
    ("module", "program", "variable"),
    [
        ("feature_cache", "feature-cache", "DECISION_SHADOW__MAX_IN_FLIGHT"),
        ("server", "decision-server", "DECISION_SHADOW__MAX_IN_FLIGHT"),
        ("server", "decision-server", "DECISION_CONTROL__CANARY_AUTO_ROLLBACK"),
    ],
)
def test_a_setting_of_a_retired_section_stops_every_process(module, program, variable):
    env = {**os.environ, variable: "4"}
    done = run_module(env, module)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{program}: invalid settings:\n")
    assert f"  {variable}: removed: " in done.stderr


def test_a_bad_secret_or_token_is_named_but_never_shown():
    given = "s3cret-token-value"
    env = {
        **os.environ,
        "DECISION_ADMIN__TOKENS": f"oncall superuser {given}",
        "DECISION_AUDIT__DATABASE_URL": "postgresql://audit:pw-s3cret@db/a",
        "DECISION_AUDIT__MAX_BACKLOG_BYTES": "lots",
        # Should the token check regress, the server must not take anyone's ports.
        "DECISION_SERVER__PORT": "0",
        "DECISION_ADMIN__PORT": "0",
        "DECISION_SERVER__METRICS_PORT": "0",
    }
    done = run_module(env, "server")
    assert done.returncode == 2
    assert "DECISION_AUDIT__MAX_BACKLOG_BYTES='lots'" in done.stderr
    assert "s3cret" not in done.stderr
    del env["DECISION_AUDIT__MAX_BACKLOG_BYTES"]
    done = run_module(env, "server", "--workers", "1")
    assert done.returncode == 2
    assert "DECISION_ADMIN__TOKENS entry 1 (oncall): role must be viewer or operator" in (
        done.stderr
    )
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


def test_settings_problems_show_no_secret_nor_the_value_of_a_misspelt_variable():
    class Section(SettingsSection):
        token: SecretStr = SecretStr("")
        url: str = ""
        count: int = 0

        @field_validator("token", "url")
        @classmethod
        def refuse(cls, value):
            raise ValueError("refused")

    class Root(BaseModel):
        section: Section = Section.model_construct()

    given = {
        "token": "s3cret",
        "url": "redis://:s3cret@h/0",
        "count": "x",
        "tokn": "operator:s3cret",  # misspelt: no such setting
    }
    with pytest.raises(ValidationError) as err:
        Root.model_validate({"section": given})
    lines = settings_problems(Root, err.value)
    assert "s3cret" not in "\n".join(lines)
    assert lines == [
        "DECISION_SECTION__TOKEN: Value error, refused",
        "DECISION_SECTION__URL='redis://:***@h/0': Value error, refused",
        "DECISION_SECTION__COUNT='x': Input should be a valid integer, unable to parse string "
        "as an integer",
        "DECISION_SECTION__TOKN: Extra inputs are not permitted",
    ]
    with pytest.raises(ValidationError) as err:
        Root.model_validate({"section": {"url": "redis://:s3cret@[bad/0"}})
    (unparsable,) = settings_problems(Root, err.value)
    assert unparsable == "DECISION_SECTION__URL='***': Value error, refused"


def test_a_section_given_whole_and_not_json_is_a_clear_refusal():
    env = {**os.environ, "DECISION_SERVER": "abc"}
    done = run_module(env, "server")
    assert done.returncode == 2
    assert done.stderr.startswith("decision-server: invalid settings:\n")
    assert '"server"' in done.stderr and "Traceback" not in done.stderr


def test_workers_whose_metrics_ports_run_past_65535_are_refused_before_starting():
    env = {**os.environ, "DECISION_SERVER__METRICS_PORT": "65535"}
    done = run_module(env, "server", "--workers", "2")
    assert done.returncode == 2
    assert "worker 1's metrics port would be 65536" in done.stderr
    assert "started" not in done.stderr
