"""Reference distributions saved with each model, for PSI drift checks against live traffic.

Per input feature and for the model's score: a ``core.drift.histogram`` of the training
period (deciles, shares per bin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.drift import histogram


def reference_distributions(
    names: Sequence[str], rows: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """The document saved as ``reference.json`` in an archive."""
    return {
        "method": "deciles of the training period; PSI with shares floored at 1e-4",
        "rows": len(rows),
        "features": {name: histogram(rows[:, i]) for i, name in enumerate(names)},
        "score": histogram(scores),
    }
