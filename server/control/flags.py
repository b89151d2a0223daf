"""The flags on-call may set through AdminService, and their defaults."""

from __future__ import annotations

from typing import Final

from server.control.state import FlagSpec, boolean, share

SHADOW_SAMPLE_RATE: Final = "shadow_sample_rate"
CANARY_AUTO_ROLLBACK: Final = "canary_auto_rollback"
# Shadow calls cost the challenger's capacity: on-call turns them on to compare a model.
DEFAULT_SHADOW_SAMPLE_RATE = 0.0
# A canary that breaches its limits is worse than none: it rolls back unless on-call says.
DEFAULT_CANARY_AUTO_ROLLBACK = True


def flag_specs() -> dict[str, FlagSpec]:
    specs = [
        FlagSpec(
            SHADOW_SAMPLE_RATE,
            "Share of model-scored decisions also sent to the challenger, off the critical "
            "path, to compare scores (0 to 1).",
            str(DEFAULT_SHADOW_SAMPLE_RATE),
            share,
        ),
        FlagSpec(
            CANARY_AUTO_ROLLBACK,
            "Roll the canary back to weight 0 by itself when it breaches its limits.",
            str(DEFAULT_CANARY_AUTO_ROLLBACK).lower(),
            boolean,
        ),
    ]
    return {spec.name: spec for spec in specs}
