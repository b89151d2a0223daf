"""``ControlStore``: the durable copy of the control state, in the audit store's database.

One row (``control_state``) holds the whole state at its version. A change is one
transaction: lock the row, read the field's entry, let the caller decide (its audit row,
or None to leave things as they are), then write the state at a higher version and the
admin audit row together. So a lever never changes without its audit row, and two
servers cannot both act on one value. Blocking (SQLAlchemy): callers run it in a thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.audit.migrate import upgrade
from server.audit.record import AdminRecord
from server.audit.store import admin_actions, admin_row, control_state, from_us
from server.control.state import Entry, decode_entries, encode_entries

log = logging.getLogger(__name__)

ROW_ID = 1
# The longest a change waits for another change's row lock (PostgreSQL; SQLite's wait is
# the engine's busy_timeout).
LOCK_TIMEOUT_S = 5
# Locks the row as the transaction's first statement: PostgreSQL takes a row lock,
# SQLite its write lock (a deferred transaction that read first could not upgrade).
_LOCK = (
    control_state.update()
    .where(control_state.c.id == ROW_ID)
    .values(version=control_state.c.version)
)
_READ = sa.select(control_state.c.version, control_state.c.entries).where(
    control_state.c.id == ROW_ID
)


@dataclass(frozen=True, slots=True)
class StoredState:
    version: int
    entries: Mapping[str, Entry]


@dataclass(frozen=True, slots=True)
class Written:
    before: Entry | None  # the field's entry that the change replaced
    state: StoredState  # the whole state after it


class ControlStore:
    def __init__(self, engine: Engine, *, migrate: bool) -> None:
        """``migrate``: bring the schema to the latest migration before the first use."""
        self.engine = engine
        self._schema_ready = not migrate

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            upgrade(self.engine)
            self._schema_ready = True

    def load(self) -> StoredState:
        """The state as last written (version 0 and nothing set when never written)."""
        self._ensure_schema()
        with self.engine.connect() as conn:
            row = conn.execute(_READ).one_or_none()
        return _stored(row)

    def write(
        self,
        field_name: str,
        entry: Entry | None,
        *,
        known: StoredState,
        record_for: Callable[[Entry | None], AdminRecord | None],
    ) -> Written | None:
        """Sets (None: clears) one field, with the audit row ``record_for`` makes of the
        entry it replaces; None, and nothing written, when ``record_for`` returns None.
        ``known``: the state this server holds. The change applies to the newer of it and
        the stored state (a store restored from a backup is behind the fleet), and its
        version is above both, so no copy's version ever goes back."""
        self._ensure_schema()
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # Another change holding the row: fail the call rather than hang a thread.
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'")
            if conn.execute(_LOCK).rowcount == 0:  # the row was deleted: start it again
                conn.execute(sa.insert(control_state).values(_row(0, {})))
            stored = _stored(conn.execute(_READ).one())
            if known.version > stored.version:
                log.warning(
                    "control state: the store holds version %d, this server %d: changing %d",
                    stored.version,
                    known.version,
                    known.version,
                )
                stored = known
            before = stored.entries.get(field_name)
            record = record_for(before)
            if record is None:
                return None
            entries = dict(stored.entries)
            if entry is None:
                entries.pop(field_name, None)
            else:
                entries[field_name] = entry
            version = stored.version + 1
            values = _row(version, entries, at_us=record.at_us)
            conn.execute(control_state.update().where(control_state.c.id == ROW_ID).values(values))
            conn.execute(sa.insert(admin_actions).values(admin_row(asdict(record))))
        # Given back as it reads back, so every copy compares equal.
        return Written(before, StoredState(version, decode_entries(values["entries"])))

    def restore(self, state: StoredState, *, over_version: int) -> bool:
        """Writes ``state`` back if the stored version is still ``over_version`` (a store
        restored from a backup, or its row deleted: version 0, is behind what the servers
        applied); False otherwise."""
        self._ensure_schema()
        values = _row(state.version, state.entries, at_us=time.time_ns() // 1000)
        statement = (
            control_state.update()
            .where(control_state.c.id == ROW_ID, control_state.c.version == over_version)
            .values(values)
        )
        with self.engine.begin() as conn:
            if conn.execute(statement).rowcount:
                return True
            if over_version == 0 and conn.execute(_READ).one_or_none() is None:
                conn.execute(sa.insert(control_state).values(values))
                return True
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _stored(row: sa.Row[Any, Any] | None) -> StoredState:
    if row is None:
        return StoredState(0, {})
    return StoredState(int(row.version), decode_entries(str(row.entries)))


def _row(version: int, entries: Mapping[str, Entry], at_us: int = 0) -> dict[str, Any]:
    return {
        "id": ROW_ID,
        "version": version,
        "entries": encode_entries(entries).decode(),
        "changed_at": from_us(at_us),
    }
