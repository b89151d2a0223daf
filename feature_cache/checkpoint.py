"""Per-partition checkpoints of the consumer's rolling state, in Redis.

One hash per partition, ``{prefix}checkpoint:{topic}:{partition}``: a field per symbol
with its ``SymbolState`` checkpoint, and ``__offset__``, the last offset those states
include. A checkpoint updates the fields of the symbols changed since the previous one
and the offset in one pipeline; unchanged symbols' fields are already current, so the
hash as a whole is the partition's state as of ``__offset__``. Offsets are committed to
Kafka only after that write, so a consumer taking over a partition restores the states
and resumes at ``__offset__ + 1``: features after a rebalance equal features without one.
An unreadable checkpoint (another format) is ignored: the partition resumes from its
committed offset with empty states, which fill again from the next book snapshots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import redis.asyncio as aioredis
from aiokafka import TopicPartition
from redis.asyncio.client import Pipeline

from feature_cache.features import SymbolState

OFFSET_FIELD = "__offset__"

log = logging.getLogger(__name__)


class StateCheckpoints:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix

    def key(self, tp: TopicPartition) -> str:
        return f"{self._prefix}checkpoint:{tp.topic}:{tp.partition}"

    def queue(
        self, pipe: Pipeline, tp: TopicPartition, states: Mapping[str, SymbolState], offset: int
    ) -> None:
        mapping: dict[str | bytes, str | bytes] = {
            symbol: json.dumps(state.to_checkpoint()) for symbol, state in states.items()
        }
        mapping[OFFSET_FIELD] = str(offset)
        pipe.hset(self.key(tp), mapping=mapping)  # type: ignore[arg-type]  # Mapping is invariant

    async def load(
        self, tp: TopicPartition, *, repair: bool = True
    ) -> tuple[int | None, dict[str, SymbolState]]:
        """The last checkpointed offset (None if there is none) and the states as of it.
        ``repair``: drop an unreadable checkpoint (its owner does; a reader does not)."""
        fields = {
            _text(name): raw for name, raw in (await self._client.hgetall(self.key(tp))).items()
        }
        offset_raw = fields.pop(OFFSET_FIELD, None)
        if offset_raw is None:
            return None, {}
        try:
            states = {
                name: SymbolState.from_checkpoint(json.loads(raw)) for name, raw in fields.items()
            }
            return int(offset_raw), states
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # Another format or corrupt: start from the committed offset, and drop the
            # hash so later checkpoints (which write changed symbols only) start clean.
            log.warning("checkpoint %s unreadable (%s); states start empty", self.key(tp), exc)
            if repair:
                await self._client.delete(self.key(tp))
            return None, {}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
