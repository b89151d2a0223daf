"""The settings base every package's settings build on.

Each package owns the sections it reads (``feature_cache.settings``,
``fallback.settings``, ``server.settings``); a process's root composes the sections it
needs under the same ``DECISION_`` names, so one environment configures every process:
``DECISION_REDIS__URL`` reaches the server and the feature cache alike.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict, SettingsError

Root = TypeVar("Root", bound=BaseModel)


class SettingsSection(BaseModel):
    """One section of a settings root: ``DECISION_<SECTION>__<FIELD>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TelemetrySettings(SettingsSection):
    """What every process (server, feature cache, labeler) logs and where its /metrics
    listens; each process's section names its own metrics port."""

    log_level: str = Field("INFO", description="Python logging level of every process.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one line per record; json: one JSON object per line (time, level, "
        "logger, process, message, trace_id, decision_id, exception).",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics endpoints.")


# A process's settings root: environment variables ``DECISION_<SECTION>__<FIELD>``.
ROOT_CONFIG = SettingsConfigDict(
    env_prefix="DECISION_", env_nested_delimiter="__", extra="forbid", frozen=True
)


def environment_lines(root: BaseModel) -> list[str]:
    """Every setting of ``root`` as the ``DECISION_<SECTION>__<FIELD>=value`` line that
    sets it, in declaration order; secrets masked; one that is unset (None, which no
    variable can say) as a ``#`` comment. What a process runs with, printable."""
    lines = []
    for section_name, section in root:
        if not isinstance(section, BaseModel):
            continue
        for field_name, value in section:
            name = f"DECISION_{section_name.upper()}__{field_name.upper()}"
            lines.append(f"# {name} unset" if value is None else f"{name}={_text(value)}")
    return lines


def _text(value: object) -> str:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, str) and "://" in value:
        return _without_password(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def _without_password(url: str) -> str:
    """``scheme://user:***@host/...``: a URL's password masked (a database or Redis URL);
    a URL that cannot be parsed, masked whole."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def settings_problems(root: type[BaseModel], exc: ValidationError) -> list[str]:
    """One line per bad setting of ``root``, named as the variable that sets it
    (``DECISION_SERVER__PORT='abc': Input should be a valid integer ...``). The value is
    shown only for a setting that exists and is not a secret (a URL's password masked):
    a misspelt variable may hold a token. A rule across a section's settings is named by
    the section (``DECISION_QUALITY__*``)."""
    lines = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error["loc"]]
        message = error["msg"]
        if not location:
            lines.append(message)
            continue
        if len(location) == 1:
            lines.append(f"DECISION_{location[0].upper()}__*: {message}")
            continue
        name = "DECISION_" + "__".join(location[:2]).upper()
        kind = _setting_type(root, location[0], location[1])
        given = error["input"]
        if kind is None or kind is SecretStr:
            lines.append(f"{name}: {message}")
            continue
        if isinstance(given, str) and "://" in given:
            given = _without_password(given)
        lines.append(f"{name}={given!r}: {message}")
    return lines


def _setting_type(root: type[BaseModel], section: str, field: str) -> object | None:
    """The declared type of setting ``section.field`` of ``root``; None if there is none."""
    section_field = root.model_fields.get(section)
    model = section_field.annotation if section_field else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    setting = model.model_fields.get(field)
    return None if setting is None else setting.annotation


# Sections no process reads any more: a variable of one is a setting that was removed,
# which stops a process as a removed field of a live section does (an unknown section
# cannot: each process reads only its own sections of the one environment).
RETIRED_SECTIONS = {
    "SHADOW": "shadow calls are tuned by constants now (server/shadow.py)",
    "CONTROL": "the flags' defaults are constants now (server/control/flags.py); "
    "on-call sets the flags with decisionctl",
}


def retired_variables(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with each ``DECISION_*`` variable of a retired section."""
    return [
        f"{name}: removed: {why}; unset it"
        for name in sorted(environ)
        for section, why in RETIRED_SECTIONS.items()
        if name.startswith(f"DECISION_{section}__")
    ]


def settings_from_environment(root: type[Root], program: str) -> Root:
    """``root`` read from the ``DECISION_*`` environment, or exit 2 saying which
    variables are wrong and why: a misconfigured process says so, not a traceback."""
    problems = retired_variables(os.environ)
    try:
        settings = root()
    except ValidationError as exc:
        problems += settings_problems(root, exc)
    except SettingsError as exc:  # a section given as one variable that is not JSON
        problems.append(str(exc))
    else:
        if not problems:
            return settings
    lines = "".join(f"  {line}\n" for line in problems)
    sys.stderr.write(f"{program}: invalid settings:\n{lines}")
    raise SystemExit(2)
