"""The settings base every package's settings build on.

Each package owns the sections it reads (``feature_cache.settings``,
``fallback.settings``, ``server.settings``); a process's root composes the sections it
needs under the same ``DECISION_`` names, so one environment configures every process:
``DECISION_REDIS__URL`` reaches the server and the feature cache alike.
"""

from __future__ import annotations

import json
import sys
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

Root = TypeVar("Root", bound=BaseModel)


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


def settings_problems(root: type[BaseModel], exc: ValidationError) -> list[str]:
    """One line per bad setting of ``root``, named as the variable that sets it
    (``DECISION_SERVER__PORT='abc': Input should be a valid integer ...``; a secret's value
    masked, a URL's password too); a rule across settings (no field of its own) as its
    message."""
    lines = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error["loc"]]
        message = error["msg"]
        if len(location) < 2:
            lines.append(message)
            continue
        name = "DECISION_" + "__".join(location[:2]).upper()
        given = error["input"]
        if _is_secret(root, location[0], location[1]):
            shown = "'**********'"
        elif isinstance(given, str):
            shown = repr(_without_password(given) if "://" in given else given)
        else:
            shown = repr(given)
        lines.append(f"{name}={shown}: {message}")
    return lines


def _is_secret(root: type[BaseModel], section: str, field: str) -> bool:
    section_field = root.model_fields.get(section)
    model = section_field.annotation if section_field else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return False
    setting = model.model_fields.get(field)
    return setting is not None and setting.annotation is SecretStr


def settings_from_environment(root: type[Root], program: str) -> Root:
    """``root`` read from the ``DECISION_*`` environment, or exit 2 saying which
    variables are wrong and why: a misconfigured process says so, not a traceback."""
    try:
        return root()
    except ValidationError as exc:
        problems = "".join(f"  {line}\n" for line in settings_problems(root, exc))
        sys.stderr.write(f"{program}: invalid settings:\n{problems}")
        raise SystemExit(2) from None
