"""The champion: a small MLP over the model input row, trained here, served as TorchScript.

The module takes raw rows (``schema.MODEL_INPUT_NAMES``: side sign, then the features)
and does its own scaling, so the served archive needs no preprocessing outside it:
features are standardised with the training period's mean and spread (clipped to
+-``CLIP``, so one absurd value cannot dominate), then given twice, as they are and
multiplied by the side sign, because most features (imbalances, OFI, returns, signed
volume) favour one side exactly as much as they hurt the other.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import torch
from torch import nn

from feature_cache.schema import MODEL_INPUT_WIDTH

CLIP: Final = 8.0


class ScoreMLP(nn.Module):
    """Maps rows of ``MODEL_INPUT_WIDTH`` floats to one probability per row."""

    def __init__(self, width: int = MODEL_INPUT_WIDTH, hidden: int = 32) -> None:
        super().__init__()
        features = width - 1
        self.clip = CLIP
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.net = nn.Sequential(
            nn.Linear(1 + 2 * features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        side = rows[:, :1]
        # Buffers read as Tensor | Module to mypy; TorchScript rejects class annotations here.
        scaled = (rows[:, 1:] - self.mean) / self.scale  # type: ignore[operator]
        z = torch.clamp(scaled, -self.clip, self.clip)
        out: torch.Tensor = self.net(torch.cat((side, z, side * z), dim=1))
        return out.squeeze(-1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(rows))


def fit_scaling(model: ScoreMLP, x: np.ndarray[Any, np.dtype[np.float32]]) -> None:
    """Sets the standardisation from training rows (robust: median and IQR)."""
    features = x[:, 1:].astype(np.float64)
    median = np.median(features, axis=0)
    q75, q25 = np.percentile(features, [75, 25], axis=0)
    spread = np.where(q75 - q25 > 1e-9, (q75 - q25) / 1.349, 1.0)  # IQR of N(0,1) is 1.349
    model.get_buffer("mean").copy_(torch.from_numpy(median.astype(np.float32)))
    model.get_buffer("scale").copy_(torch.from_numpy(spread.astype(np.float32)))


def to_torchscript(model: ScoreMLP) -> torch.jit.ScriptModule:
    scripted: torch.jit.ScriptModule = torch.jit.script(model.eval())
    return scripted
