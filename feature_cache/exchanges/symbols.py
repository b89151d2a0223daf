"""One form for every venue's symbols: ``VENUE:BASE-QUOTE`` (``BINANCE:BTC-USD``).

The venue in front keeps two venues' books apart in the consumer and in Redis. Base and
quote go through ``ALIASES`` (``XBT`` -> ``BTC``); a concatenated symbol is split at the
longest of ``KNOWN_QUOTES`` that ends it. Two venue symbols that map to one key are not
merged: :class:`SymbolKeys` gives the key to the first and refuses the second, which the
replay summary reports.
Mapping: docs/market-data.md#symbols
"""

from __future__ import annotations

# Kraken's codes for bitcoin and dogecoin; USDT, the quote standing in for USD where a
# venue lists no USD.
ALIASES = {"XBT": "BTC", "XDG": "DOGE", "USDT": "USD"}
# Longest first, so that USDT wins over USD and FDUSD over USD.
KNOWN_QUOTES = tuple(
    sorted(
        (
            "USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USDP", "DAI", "USD", "EUR", "GBP",
            "JPY", "AUD", "CAD", "CHF", "TRY", "BRL", "BTC", "XBT", "ETH", "BNB", "SOL",
        ),
        key=len,
        reverse=True,
    )
)  # fmt: skip


def pair(native: str) -> str:
    """``XBT/USD`` -> ``BTC-USD``; ``btcusdt`` -> ``BTC-USD``; ``ETH-BTC`` stays."""
    text = native.strip().upper()
    for separator in ("/", "-", "_"):
        if separator in text:
            base, _, quote = text.partition(separator)
            return f"{ALIASES.get(base, base)}-{ALIASES.get(quote, quote)}"
    for quote in KNOWN_QUOTES:
        if text.endswith(quote) and len(text) > len(quote):
            base = text[: -len(quote)]
            return f"{ALIASES.get(base, base)}-{ALIASES.get(quote, quote)}"
    return text


def venue_key(venue: str, native: str) -> str:
    return f"{venue.upper()}:{pair(native)}"


class SymbolKeys:
    """The keys of one replay: each venue symbol gets ``venue_key``, unless another venue
    symbol has it already; ``refused`` lists those (venue symbol -> the key it lost)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], str | None] = {}
        self._owner: dict[str, str] = {}
        self.refused: dict[str, str] = {}

    def key(self, venue: str, native: str) -> str | None:
        known = self._keys.get((venue, native), "")
        if known != "":
            return known
        key = venue_key(venue, native)
        owner = self._owner.setdefault(key, native)
        result = key if owner == native else None
        if result is None:
            self.refused[f"{venue.upper()}:{native}"] = key
        self._keys[(venue, native)] = result
        return result
