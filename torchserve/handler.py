"""TorchServe handler for both models: N rows in, one score per row out.

Shipped inside each model archive and run by TorchServe's Python worker, so it imports
nothing from this project; the archive's ``model-meta.json`` names the framework
(``torchscript`` or ``xgboost``), the serialized file, the row width and the version hash.
It takes TorchServe's native ``Predictions`` (packed float32 ``rows``) and the Open
Inference Protocol's ``ModelInfer`` (an FP32 tensor ``rows``). Malformed rows get an error
answer naming the problem, never an exception, and the batch's other requests are scored
in one model call. Request and response forms: docs/model-serving.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

Rows = np.ndarray[Any, np.dtype[np.float32]]
WARMUP_BATCHES = (1, 2, 8, 64)


def _torchscript_scorer(path: str) -> Callable[[Rows], list[float]]:
    import torch

    torch.set_num_threads(1)  # one worker per core is the scaling unit
    model = torch.jit.load(path)  # type: ignore[no-untyped-call]
    model.eval()

    def score(rows: Rows) -> list[float]:
        with torch.inference_mode():
            scores: list[float] = model(torch.from_numpy(rows)).tolist()
        return scores

    return score


def _xgboost_scorer(path: str) -> Callable[[Rows], list[float]]:
    import xgboost

    booster = xgboost.Booster(model_file=path)
    booster.set_param({"nthread": 1})

    def score(rows: Rows) -> list[float]:
        scores: list[float] = booster.inplace_predict(rows, validate_features=False).tolist()
        return scores

    return score


SCORERS = {"torchscript": _torchscript_scorer, "xgboost": _xgboost_scorer}


class ScoreHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.score: Callable[[Rows], list[float]] = lambda rows: []
        self.width = 0
        self.version = ""

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "model-meta.json")) as f:
            meta = json.load(f)
        self.width = int(meta["input_width"])
        self.version = meta["version"]
        framework = meta.get("framework", "torchscript")
        if framework not in SCORERS:
            raise ValueError(f"unknown framework {framework!r} in model-meta.json")
        self.score = SCORERS[framework](os.path.join(model_dir, meta["serialized_file"]))
        # Warm-up: TorchScript's profiling executor optimises after a few runs per shape,
        # and the first XGBoost prediction allocates its buffers.
        for n in WARMUP_BATCHES:
            for _ in range(3):
                self.score(np.zeros((n, self.width), dtype=np.float32))
        self.initialized = True

    def _checked(self, rows: Rows) -> Rows:
        if not np.isfinite(rows).all():
            bad = int(np.argwhere(~np.isfinite(rows))[0][0])
            raise ValueError(f"row {bad} has a non-finite value")
        return rows

    def _packed_rows(self, raw: bytes | bytearray) -> Rows:
        if len(raw) == 0 or len(raw) % (4 * self.width) != 0:
            raise ValueError(
                f"'rows' has {len(raw)} bytes, not a whole number of {self.width}-float rows"
            )
        return self._checked(np.frombuffer(bytes(raw), dtype="<f4").reshape(-1, self.width))

    def _tensor_rows(self, body: dict[str, Any]) -> Rows:
        tensors = [t for t in body.get("inputs") or () if isinstance(t, dict)]
        tensor = next((t for t in tensors if t.get("name") == "rows"), None)
        if tensor is None:
            raise ValueError("missing input tensor 'rows'")
        if tensor.get("datatype") != "FP32":
            raise ValueError(f"input 'rows' must be FP32, got {tensor.get('datatype')}")
        shape, data = tensor.get("shape"), tensor.get("data")
        if not isinstance(shape, list) or len(shape) != 2 or shape[1] != self.width:
            raise ValueError(f"input 'rows' must have shape [n, {self.width}], got {shape}")
        if not isinstance(data, list) or len(data) != shape[0] * self.width or not data:
            raise ValueError(f"input 'rows' has {len(data or ())} values for shape {shape}")
        return self._checked(np.asarray(data, dtype=np.float32).reshape(-1, self.width))

    def _rows(self, request: Any) -> Rows:
        if not isinstance(request, dict):
            raise ValueError("request is not a map of inputs")
        if "rows" in request:
            return self._packed_rows(request["rows"])
        body = request.get("body")
        if isinstance(body, dict):
            return self._tensor_rows(body)
        raise ValueError("missing input 'rows'")

    def _answer(self, request: Any, scores: list[float] | None, error: str | None) -> str:
        body = request.get("body") if isinstance(request, dict) else None
        if not isinstance(body, dict):  # native Predictions
            if error is not None:
                return json.dumps({"error": error})
            return json.dumps({"model_version": self.version, "scores": scores})
        n = len(scores or ())
        output = (
            {"name": "error", "datatype": "BYTES", "shape": [1], "data": [error]}
            if error is not None
            else {"name": "scores", "datatype": "FP32", "shape": [n], "data": scores}
        )
        return json.dumps(
            {
                "id": str(body.get("id") or ""),
                "model_name": str(body.get("model_name") or ""),
                "model_version": self.version,
                "outputs": [output],
            }
        )

    def handle(self, data: list[Any], context: Any) -> list[str]:
        # Errors are answers, not exceptions: an exception would fail every request of the
        # TorchServe batch, and a reply missing a field kills the worker.
        parsed: list[Rows | str] = []
        for request in data:
            try:
                parsed.append(self._rows(request))
            except ValueError as exc:
                parsed.append(str(exc))
        valid = [p for p in parsed if not isinstance(p, str)]
        scores = self.score(np.concatenate(valid)) if valid else []
        out: list[str] = []
        at = 0
        for request, p in zip(data, parsed, strict=True):
            if isinstance(p, str):
                out.append(self._answer(request, None, p))
                continue
            n = p.shape[0]
            out.append(self._answer(request, scores[at : at + n], None))
            at += n
        return out


_service = ScoreHandler()


def handle(data: list[Any] | None, context: Any) -> list[str] | None:
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
