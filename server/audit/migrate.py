"""Schema migrations of the audit store, with alembic, run from code (no alembic.ini).

alembic is imported only when a migration runs: a store already at the head revision
(every start but a store's first) is told by one query, and the server and its shipper
start without alembic's import (about half a second of CPU each)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.audit.partitions import ensure_ahead

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# Revisions are numbered in their file names (0001_..., 0002_...), each on the one before:
# the head is the highest (tests/server/audit/test_store.py holds alembic to it).
HEAD = max(p.name[:4] for p in (MIGRATIONS / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _run(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    """Runs an alembic command on one of ``engine``'s connections, in a transaction."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        step(config, revision)


def at_head(engine: Engine) -> bool:
    """Whether the store's schema is at ``HEAD`` (False for a store never migrated)."""
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.execute(sa.text("SELECT version_num FROM alembic_version"))
        return [row[0] for row in versions] == [HEAD]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Brings the store's schema to ``revision``; at the head, also makes the days' partitions
    that are missing (``partitions.ensure_ahead``: one query when none are)."""
    if revision != "head" or not at_head(engine):
        from alembic import command

        _run(engine, command.upgrade, revision)
    if revision == "head":
        ensure_ahead(engine)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    _run(engine, command.downgrade, revision)
