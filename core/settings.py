"""The settings base every package's settings build on.

Each package owns the sections it reads (``feature_cache.settings``,
``fallback.settings``, ``server.settings``); a process's root composes the sections it
needs under the same ``DECISION_`` names, so one environment configures every process:
``DECISION_REDIS__URL`` reaches the server and the feature cache alike.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, SecretStr
from pydantic_settings import SettingsConfigDict


class SettingsSection(BaseModel):
    """One section of a settings root: ``DECISION_<SECTION>__<FIELD>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    """``scheme://user:***@host/...``: a URL's password masked (a database or Redis URL)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
