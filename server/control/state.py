"""The shared control state: breaker overrides, flags, kill switches and the canary weight.

On-call changes it through AdminService; its durable copy lives in the audit store's
database, a copy in Redis distributes it (``server.control.shared``), and every server
keeps the latest ``ControlState`` for its hot path. A change may carry
an expiry: it is then ignored from that wall-clock time on by every server, whether or
not any of them hears of it, so a TTL needs no process to enforce it.

Both copies hold the state as one JSON object of ``Entry``s (``encode_entries``), under
the fields ``breaker:<replica>``, ``flag:<name>``, ``kill:<symbol or *>`` and ``canary``,
with the state's version beside it.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

log = logging.getLogger(__name__)

GLOBAL_SCOPE: Final = "*"
BREAKER_PREFIX: Final = "breaker:"
FLAG_PREFIX: Final = "flag:"
KILL_PREFIX: Final = "kill:"
CANARY_FIELD: Final = "canary"


class BreakerMode(enum.IntEnum):
    """Values match ``decision.v1.BreakerMode``."""

    AUTO = 1
    FORCE_OPEN = 2
    FORCE_CLOSED = 3


@dataclass(frozen=True, slots=True)
class Change:
    """Who set an entry, why, when, and until when (``expires_at_us`` 0: no expiry)."""

    changed_by: str
    reason: str
    changed_at_us: int
    expires_at_us: int = 0

    def expired(self, now_us: int) -> bool:
        return 0 < self.expires_at_us <= now_us


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored setting: its value (JSON-able) and its change."""

    value: Any
    change: Change

    def doc(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "changed_by": self.change.changed_by,
            "reason": self.change.reason,
            "changed_at_us": self.change.changed_at_us,
            "expires_at_us": self.change.expires_at_us,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Entry:
        return cls(
            doc["value"],
            Change(
                str(doc["changed_by"]),
                str(doc["reason"]),
                int(doc["changed_at_us"]),
                int(doc.get("expires_at_us") or 0),
            ),
        )


def encode_entries(entries: Mapping[str, Entry]) -> bytes:
    """The whole state's entries as one JSON object, as both copies store it."""
    return orjson.dumps({name: entry.doc() for name, entry in entries.items()})


def decode_entries(raw: bytes | str) -> dict[str, Entry]:
    """``encode_entries``' inverse; an entry that does not decode is left out, logged
    (``ValueError`` when the whole is not an object)."""
    docs = orjson.loads(raw)
    if not isinstance(docs, dict):
        raise ValueError(f"control state is not a JSON object: {type(docs).__name__}")
    entries = {}
    for name, doc in docs.items():
        try:
            entries[name] = Entry.from_doc(doc)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("control entry %s ignored: %r", name, exc)
    return entries


@dataclass(frozen=True, slots=True)
class FlagSpec:
    """A flag on-call may set: ``parse`` turns the text into the value or raises
    ``ValueError`` saying what is wrong."""

    name: str
    description: str
    default: str
    parse: Callable[[str], Any]


def share(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{text!r} is not a share in [0, 1]")
    return value


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def flag_text(value: Any) -> str:
    """A parsed flag value as stored and shown ("true", "0.5")."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True, slots=True)
class ControlState:
    """A snapshot of the shared state, as read at ``version``; immutable, so the hot path
    reads it without locks while a sync replaces it."""

    version: int = 0
    entries: Mapping[str, Entry] = field(default_factory=dict)
    # Flag values parsed once per snapshot, not per decision: those set, and defaults.
    flag_values: Mapping[str, Any] = field(default_factory=dict)
    flag_defaults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_entries(
        cls, version: int, entries: Mapping[str, Entry], flags: Mapping[str, FlagSpec]
    ) -> ControlState:
        parsed: dict[str, Any] = {}
        defaults = {name: spec.parse(spec.default) for name, spec in flags.items()}
        for name, spec in flags.items():
            entry = entries.get(FLAG_PREFIX + name)
            if entry is None:
                continue
            try:
                parsed[name] = spec.parse(str(entry.value))
            except ValueError as exc:  # written by something else than AdminService
                log.warning("flag %s: ignoring stored value: %s", name, exc)
        return cls(version, dict(entries), parsed, defaults)

    def _live(self, field_name: str, now_us: int) -> Entry | None:
        entry = self.entries.get(field_name)
        if entry is None or entry.change.expired(now_us):
            return None
        return entry

    def breaker(self, replica: str, now_us: int) -> tuple[BreakerMode, Change | None]:
        entry = self._live(BREAKER_PREFIX + replica, now_us)
        if entry is None:
            return BreakerMode.AUTO, None
        try:
            return BreakerMode[str(entry.value)], entry.change
        except KeyError:
            return BreakerMode.AUTO, None

    def breaker_mode(self, replica: str, now_us: int) -> BreakerMode:
        return self.breaker(replica, now_us)[0]

    def kill_switch(self, symbol: str, now_us: int) -> tuple[str, Change] | None:
        """The switch that stops ``symbol``, its own before the global one."""
        for scope in (symbol, GLOBAL_SCOPE):
            entry = self._live(KILL_PREFIX + scope, now_us)
            if entry is not None and entry.value:
                return scope, entry.change
        return None

    def kill_switches(self, now_us: int) -> dict[str, Change]:
        return {
            f.removeprefix(KILL_PREFIX): e.change
            for f, e in self.entries.items()
            if f.startswith(KILL_PREFIX) and e.value and not e.change.expired(now_us)
        }

    def flag(self, spec: FlagSpec, now_us: int) -> tuple[Any, Change | None]:
        """The flag's value in effect and, when it was set and is live, its change."""
        entry = self._live(FLAG_PREFIX + spec.name, now_us)
        change = entry.change if entry is not None and spec.name in self.flag_values else None
        value = self.flag_value(spec.name, now_us)
        return (spec.parse(spec.default) if value is None else value), change

    def flag_value(self, name: str, now_us: int) -> Any:
        """The flag's parsed value in effect: as set unless unset or expired, else the
        default (hot path: no parsing)."""
        entry = self._live(FLAG_PREFIX + name, now_us)
        if entry is not None and name in self.flag_values:
            return self.flag_values[name]
        return self.flag_defaults.get(name)

    def canary(self, now_us: int) -> tuple[float, Change | None]:
        entry = self._live(CANARY_FIELD, now_us)
        if entry is None:
            return 0.0, None
        return float(entry.value), entry.change
