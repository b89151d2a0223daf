"""The champion's shape: a small MLP over the model input row, exported as TorchScript.

Training on market data is the models issue; until then ``build_model`` gives a
deterministic model from a seed, so archives and their version hashes are reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from feature_cache.schema import MODEL_INPUT_WIDTH


class ScoreMLP(nn.Module):
    """Maps rows of ``MODEL_INPUT_WIDTH`` floats to one probability per row."""

    def __init__(self, width: int = MODEL_INPUT_WIDTH, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(rows)).squeeze(-1)


def build_model(seed: int = 0) -> torch.jit.ScriptModule:
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ScoreMLP().eval()
    finally:
        torch.random.set_rng_state(generator_state)
    scripted: torch.jit.ScriptModule = torch.jit.script(model)
    return scripted


def main() -> None:
    """Saves the TorchScript model; run with a fixed PYTHONHASHSEED for a reproducible file."""
    parser = argparse.ArgumentParser(description="Save the seeded TorchScript model.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.jit.save(build_model(args.seed), str(args.out))


if __name__ == "__main__":
    main()
