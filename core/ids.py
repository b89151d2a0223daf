"""Decision ids: UUIDv7 (RFC 9562), made by uuid_utils.

A UUIDv7 begins with the Unix time in milliseconds it was made at: a decision's day is
read from its id, so the audit archive finds an id in one day's files, not by scanning
them all, and ids made together sit together in the store's indexes. It costs ~0.2 µs,
against ~2.4 µs for ``uuid.uuid4`` (os.urandom each). Ids made before the change are
version 4 and say nothing of their time.
"""

from __future__ import annotations

import uuid

import uuid_utils


def new_decision_id() -> str:
    return str(uuid_utils.uuid7())


def id_time_ms(decision_id: str) -> int | None:
    """When a UUIDv7 id was made (Unix ms); None for any other id."""
    try:
        parsed = uuid.UUID(decision_id)
    except ValueError:
        return None
    return parsed.int >> 80 if parsed.version == 7 else None
