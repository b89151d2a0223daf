"""The flags on-call may set through AdminService, with their defaults from settings."""

from __future__ import annotations

from typing import Final

from server.control.state import FlagSpec, boolean, share
from server.settings import ControlSettings

SHADOW_SAMPLE_RATE: Final = "shadow_sample_rate"
CANARY_AUTO_ROLLBACK: Final = "canary_auto_rollback"


def flag_specs(control: ControlSettings) -> dict[str, FlagSpec]:
    specs = [
        FlagSpec(
            SHADOW_SAMPLE_RATE,
            "Share of model-scored decisions also sent to the challenger, off the critical "
            "path, to compare scores (0 to 1).",
            str(control.shadow_sample_rate),
            share,
        ),
        FlagSpec(
            CANARY_AUTO_ROLLBACK,
            "Roll the canary back to weight 0 by itself when it breaches its limits.",
            str(control.canary_auto_rollback).lower(),
            boolean,
        ),
    ]
    return {spec.name: spec for spec in specs}
