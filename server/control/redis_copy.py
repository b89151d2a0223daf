"""``RedisCopy``: the control state's copy in Redis, which tells every server of a change.

One hash, ``{prefix}control:state``, holds the version and the entries (as the durable
copy has them), and each write publishes the version on ``{prefix}control:changed``. It
is only ever replaced whole, by a script that first checks that what it replaces is what
the writer judged, so two servers repairing it at once cannot undo each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from server.control.durable import StoredState
from server.control.state import Entry, decode_entries, encode_entries

REDIS_ERRORS = (aioredis.RedisError, OSError)

# KEYS: the hash, the channel. ARGV: what is expected there (the version as stored, ""
# when nothing is, "!<type>" when the key is not a hash), the new version, the entries.
# Replaces the key whole; returns 1 when it wrote.
_REPLACE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
local current = ''
if kind == 'hash' then
  current = redis.call('HGET', KEYS[1], 'version') or ''
elseif kind ~= 'none' then
  current = '!' .. kind
end
if current ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'entries', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class Copy:
    """What Redis holds: ``raw_version`` as stored ("" when there is nothing), and the
    state, None when nothing is there or it does not read as a state."""

    raw_version: str
    version: int | None
    entries: Mapping[str, Entry]
    unreadable: str = ""  # why it does not read as a state


@dataclass(frozen=True, slots=True)
class Verdict:
    in_step: bool = False  # Redis holds this server's state
    repair: bool = False  # write this server's state to Redis
    loss: str = ""  # why Redis's copy must have lost data, when it did


def judge(
    copy: Copy, mine: StoredState, *, redis_seen: int, first_look: bool, against_store: bool
) -> Verdict:
    """What to make of Redis's ``copy`` for a server that applies ``mine`` (read from the
    store) and has seen Redis hold ``redis_seen``. ``against_store``: the store was read
    after ``copy``, so a higher version in Redis was never a change."""
    if copy.unreadable:
        return Verdict(repair=True, loss=f"Redis's control state is unreadable: {copy.unreadable}")
    if copy.version is None:
        if mine.version == 0:
            return Verdict(in_step=True)  # nothing was ever set
        # Not written yet (the fleet's first change) unless Redis held a state before, or
        # this server starts now: then the fleet's writes went with Redis.
        lost = redis_seen > 0 or first_look
        why = f"Redis held no control state; this server has version {mine.version}"
        return Verdict(repair=True, loss=why if lost else "")
    if copy.version > mine.version:
        if not against_store:
            return Verdict()  # a change this server has not read yet, or not one: read again
        why = f"Redis holds version {copy.version}, which the audit store does not"
        return Verdict(repair=True, loss=why)
    if copy.version < redis_seen:
        why = f"Redis's control state went back from version {redis_seen} to {copy.version}"
        return Verdict(repair=True, loss=why)
    if copy.version < mine.version:
        return Verdict(repair=True)  # behind: a change Redis did not take yet
    if copy.entries != mine.entries:
        why = f"Redis's control state at version {copy.version} changed without a change"
        return Verdict(repair=True, loss=why)
    return Verdict(in_step=True)


class RedisCopy:
    def __init__(self, url: str, *, key_prefix: str, timeout_ms: float) -> None:
        timeout_s = timeout_ms / 1000.0
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        # Pub/sub waits for messages indefinitely, so it gets a client without a read
        # timeout; its health is checked by pinging an idle connection.
        self.subscriber = aioredis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, health_check_interval=5
        )
        self._replace = self._redis.register_script(_REPLACE)
        self.key = f"{key_prefix}control:state"
        self.channel = f"{key_prefix}control:changed"

    async def aclose(self) -> None:
        await self.subscriber.aclose()
        await self._redis.aclose()

    async def raw_version(self) -> str:
        """The version as stored ("" when there is none, "!<type>" when the key is not a
        hash); raises ``REDIS_ERRORS``."""
        try:
            return _text(await self._redis.hget(self.key, "version"))
        except ResponseError as exc:
            return await self._wrong_type(exc)

    async def read(self) -> Copy:
        """Raises ``REDIS_ERRORS`` when Redis does not answer."""
        try:
            raw_version, raw_entries = await self._redis.hmget(self.key, "version", "entries")
        except ResponseError as exc:
            text = await self._wrong_type(exc)
            return Copy(text, None, {}, unreadable=f"the key is a {text[1:]}, not a hash")
        text = _text(raw_version)
        if not text:
            return Copy("", None, {})
        try:
            version = int(text)
            if text != str(version):
                raise ValueError(f"version {text!r} is not as this code writes it")
            return Copy(text, version, decode_entries(raw_entries or b""))
        except ValueError as exc:  # not written by this code
            return Copy(text, None, {}, unreadable=str(exc))

    async def _wrong_type(self, exc: ResponseError) -> str:
        if not str(exc).startswith("WRONGTYPE"):
            raise exc
        return "!" + _text(await self._redis.type(self.key))

    async def replace(self, expected: str, version: int, entries: Mapping[str, Entry]) -> bool:
        """Writes the state if the stored version is still ``expected``; False when it
        changed meanwhile. Raises ``REDIS_ERRORS``."""
        args: list[str | int | bytes] = [expected, version, encode_entries(entries)]
        return bool(await self._replace(keys=[self.key, self.channel], args=args))


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw
