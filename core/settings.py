"""The settings base every package's settings build on.

Each package owns the sections it reads (``feature_cache.settings``,
``fallback.settings``, ``server.settings``); a process's root composes the sections it
needs under the same ``DECISION_`` names, so one environment configures every process:
``DECISION_REDIS__URL`` reaches the server and the feature cache alike.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_settings import SettingsConfigDict


class SettingsSection(BaseModel):
    """One section of a settings root: ``DECISION_<SECTION>__<FIELD>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# A process's settings root: environment variables ``DECISION_<SECTION>__<FIELD>``.
ROOT_CONFIG = SettingsConfigDict(
    env_prefix="DECISION_", env_nested_delimiter="__", extra="forbid", frozen=True
)
