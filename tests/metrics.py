"""Scraping a real /metrics endpoint over HTTP, as Prometheus does."""

from __future__ import annotations

import re
import urllib.request

from core.metrics_http import Samples, scrape

__all__ = ["Samples", "exported_names", "names_in", "scrape", "value"]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def exported_names(port: int) -> set[str]:
    """The sample names the endpoint serves (a counter's _total, a histogram's _bucket)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line[:1] != "#"}


def names_in(expressions: list[str], prefixes: tuple[str, ...]) -> set[str]:
    """The metric names with one of ``prefixes`` that PromQL ``expressions`` mention."""
    pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, prefixes)) + r")[a-z0-9_]+\b")
    return {name for expr in expressions for name in pattern.findall(expr)}
