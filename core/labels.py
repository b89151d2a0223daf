"""The label the models learn and live quality is judged by (docs/architecture.md's decision
semantics), in one place: training (``torchserve.dataset``) and the labeler (``quality``)
both call it, and a change here makes the cached models stale (``torchserve.train``)."""

from __future__ import annotations


def favourable_move(side_sign: float, mid_now: float, mid_later: float, spread_bps: float) -> bool:
    """Whether the mid a horizon later (``mid_later``) has moved in the side's favour, up
    for a buy (``side_sign`` +1), down for a sell (-1), by more than the half-spread now."""
    half_spread = spread_bps * mid_now / 2e4  # spread_bps back to price units
    return side_sign * (mid_later - mid_now) > half_spread
