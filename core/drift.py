"""Distribution drift: decile histograms and the population stability index (PSI).

A histogram has bin edges at a sample's deciles (repeated edges merged, so a feature with
few distinct values gets fewer bins) and the share of the sample in each bin. Bins are
open at both ends, so a live value outside the reference range still lands in the first
or last bin.

PSI = sum over bins of (live - ref) * ln(live / ref), shares floored at ``EPSILON`` so an
empty bin does not make it infinite. Usual reading: < 0.1 stable, 0.1-0.25 drifting,
> 0.25 shifted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

EPSILON = 1e-4
# The usual reading of PSI, which status and the alert rules (k8s) share.
DRIFTING_PSI = 0.1
SHIFTED_PSI = 0.25
QUANTILES = tuple(i / 10 for i in range(1, 10))


def histogram(values: np.ndarray[Any, Any]) -> dict[str, list[float]]:
    """``{"edges": inner edges, "shares": one share per bin}`` of ``values``."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return {"edges": [], "shares": [1.0]}
    edges = np.unique(np.quantile(finite, QUANTILES))
    return {"edges": edges.tolist(), "shares": shares(edges, finite).tolist()}


def shares(edges: Sequence[float] | np.ndarray[Any, Any], values: np.ndarray[Any, Any]) -> Any:
    """Share of ``values`` in each of the ``len(edges) + 1`` bins (value == edge: upper bin)."""
    counts = np.bincount(
        np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right"),
        minlength=len(edges) + 1,
    )
    return counts / max(1, len(values))


def psi(reference: dict[str, list[float]], values: np.ndarray[Any, Any]) -> float:
    """PSI of ``values`` against a ``histogram`` of the reference period."""
    ref = np.maximum(np.asarray(reference["shares"], dtype=np.float64), EPSILON)
    live = np.maximum(shares(reference["edges"], values.astype(np.float64)), EPSILON)
    return float(np.sum((live - ref) * np.log(live / ref)))
