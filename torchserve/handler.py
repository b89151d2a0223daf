"""TorchServe handler: N packed float32 rows in, one score per row out.

Shipped inside the model archive and run by TorchServe's Python worker, so it imports
nothing from this project. Request input ``rows``: little-endian float32, row-major,
``input_width`` floats a row (from ``model-meta.json`` in the archive). Response: JSON
``{"model_version": str, "scores": [float, ...]}``, or ``{"error": str}`` for a request
whose rows are malformed (wrong width, non-finite values); the other requests of the
same TorchServe batch are scored as usual.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch


class ScoreHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.model: Any = None
        self.width = 0
        self.version = ""

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "model-meta.json")) as f:
            meta = json.load(f)
        self.width = int(meta["input_width"])
        self.version = meta["version"]
        torch.set_num_threads(1)  # one worker per core is the scaling unit
        self.model = torch.jit.load(  # type: ignore[no-untyped-call]
            os.path.join(model_dir, meta["serialized_file"])
        )
        self.model.eval()
        # Warm-up: TorchScript's profiling executor optimises after a few runs per shape.
        with torch.inference_mode():
            for n in (1, 2, 8, 64):
                for _ in range(3):
                    self.model(torch.zeros((n, self.width), dtype=torch.float32))
        self.initialized = True

    def _rows(self, request: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
        raw = request.get("rows") if isinstance(request, dict) else None
        if raw is None:
            raise ValueError("missing input 'rows'")
        if len(raw) == 0 or len(raw) % (4 * self.width) != 0:
            raise ValueError(
                f"'rows' has {len(raw)} bytes, not a whole number of {self.width}-float rows"
            )
        rows = np.frombuffer(bytes(raw), dtype="<f4").reshape(-1, self.width)
        if not np.isfinite(rows).all():
            bad = int(np.argwhere(~np.isfinite(rows))[0][0])
            raise ValueError(f"row {bad} has a non-finite value")
        return rows

    def handle(self, data: list[Any], context: Any) -> list[str]:
        parsed: list[Any] = []
        for request in data:
            try:
                parsed.append(self._rows(request))
            except ValueError as exc:
                parsed.append(str(exc))
        valid = [p for p in parsed if not isinstance(p, str)]
        scores: list[float] = []
        if valid:
            with torch.inference_mode():
                batch = torch.from_numpy(np.concatenate(valid))
                scores = self.model(batch).tolist()
        out: list[str] = []
        at = 0
        for p in parsed:
            if isinstance(p, str):
                out.append(json.dumps({"error": p}))
                continue
            n = p.shape[0]
            out.append(json.dumps({"model_version": self.version, "scores": scores[at : at + n]}))
            at += n
        return out


_service = ScoreHandler()


def handle(data: list[Any] | None, context: Any) -> list[str] | None:
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
