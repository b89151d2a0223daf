"""The parts of a ``SymbolState`` checkpoint document: books and window groups as JSON.

Float arrays (books as price, size, price, ...; window values) are base64 of
little-endian IEEE doubles, window times are the first time then the gaps, and a group of
windows that take the same entries stores them once. Loading checks every part and raises
ValueError on a document that is not one of these.
"""

from __future__ import annotations

import base64
import binascii
import operator
import struct
from collections import deque
from collections.abc import Sequence
from itertools import accumulate, chain, islice
from typing import Any

from sortedcontainers import SortedDict

from feature_cache.windows import RESUM_EVERY, Series, SumWindow

CHECKPOINT_FORMAT = 2


def pack_book(book: SortedDict[float, float]) -> str:
    """A book packed as ``price, size, price, size, ...``."""
    return _pack([*chain.from_iterable(book.items())])


def load_book(text: str) -> SortedDict[float, float]:
    """A book from the packed ``price, size, price, size, ...``."""
    numbers = _unpack(text)
    if len(numbers) % 2:
        raise ValueError("malformed checkpoint: a book of odd length")
    return SortedDict(zip(numbers[0::2], numbers[1::2], strict=True))


def pack_window_group(windows: Sequence[Series]) -> dict[str, Any]:
    """The longest window's entries, the shorter ones' lengths, and every running sum.

    ``windows`` take the same entries, shortest span first, so each shorter one holds a
    suffix of the longest one's.
    """
    times = windows[-1].times
    gaps = [times[0], *map(operator.sub, islice(times, 1, None), times)] if times else []
    return {
        "time_gaps": gaps,
        "values": _pack(windows[-1].values),
        "lengths": [len(w.times) for w in windows[:-1]],
        "sums": [[w.total, w.removals] for w in windows if isinstance(w, SumWindow)],
    }


def load_window_group(windows: Sequence[Series], doc: dict[str, Any]) -> None:
    """Fills ``windows`` (fresh, in the order they were packed) from ``doc``."""
    times = list(accumulate(int(gap) for gap in doc["time_gaps"]))
    values = _unpack(doc["values"])
    lengths = [int(n) for n in doc["lengths"]]
    summed = [w for w in windows if isinstance(w, SumWindow)]
    sums = [(float(total), int(removals)) for total, removals in doc["sums"]]
    count = len(times)
    if len(values) != count or len(lengths) != len(windows) - 1 or len(sums) != len(summed):
        raise ValueError("malformed checkpoint: window lengths disagree")
    for window, length in zip(windows, [*lengths, count], strict=True):
        if not 0 <= length <= count:
            raise ValueError(f"malformed checkpoint: window length {length} of {count}")
        window.times = deque(times[count - length :])
        window.values = deque(values[count - length :])
    for window, (total, removals) in zip(summed, sums, strict=True):
        if not 0 <= removals < RESUM_EVERY:
            raise ValueError(f"malformed checkpoint: removal count {removals}")
        window.total, window.removals = total, removals


# Little-endian IEEE doubles: exact (-0.0 included), the same on any host, and far
# quicker to encode and decode than decimal text.
def _pack(values: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}d", *values)).decode("ascii")


def _unpack(text: str) -> list[float]:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"malformed checkpoint: {exc}") from exc
    if len(raw) % 8:
        raise ValueError("malformed checkpoint: a float array cut short")
    return list(struct.unpack(f"<{len(raw) // 8}d", raw))
