"""Triton Python-backend model for both archives: the archive's own scorer behind Triton's
dynamic batcher.

Copied into a Triton model repository as ``<model>/1/model.py`` by ``torchserve.triton``,
beside the archive's ``handler.py``, ``model-meta.json`` and serialized model, so it
imports nothing from this project and scores exactly as TorchServe does. Input ``rows``
(FP32, ``[n, input_width]``); output ``scores`` (FP32, ``[n, 1]``). Serving with Triton:
docs/model-serving.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

# The backend's stub starts Python isolated from the environment (PYTHONPATH is ignored):
# python-path.txt beside this file names the directories that hold numpy, torch and
# xgboost, put on sys.path before anything imports them.
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "python-path.txt")) as _paths:
    sys.path[:0] = [line.strip() for line in _paths if line.strip()]

import numpy as np  # noqa: E402 (after the path above)
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

# Tensors cross the stub through torch's DLPack: the stub's numpy path misreads numpy 2
# arrays both ways. (torch does not list these in __all__.)
_from_dlpack = torch.from_dlpack  # type: ignore[attr-defined]
_to_dlpack = torch.to_dlpack  # type: ignore[attr-defined]

WARMUP_BATCHES = (1, 8, 64)


def _archive_handler() -> Any:
    spec = importlib.util.spec_from_file_location(
        "archive_handler", os.path.join(HERE, "handler.py")
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no handler.py in {HERE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    """One archive's scorer, as Triton's Python backend calls it."""

    def initialize(self, args: dict[str, str]) -> None:
        with open(os.path.join(HERE, "model-meta.json")) as f:
            meta = json.load(f)
        self.width = int(meta["input_width"])
        scorers = _archive_handler().SCORERS
        self.score = scorers[meta["framework"]](os.path.join(HERE, meta["serialized_file"]))
        for n in WARMUP_BATCHES:
            self.score(np.zeros((n, self.width), dtype=np.float32))

    def execute(self, requests: list[Any]) -> list[Any]:
        """All valid rows of Triton's batch go through the model in one call; a request
        with a non-finite value gets an error of its own."""
        rows = [
            _from_dlpack(pb_utils.get_input_tensor_by_name(r, "rows").to_dlpack()).numpy().copy()
            for r in requests
        ]
        valid = [r for r in rows if np.isfinite(r).all()]
        scores = np.asarray(
            self.score(np.concatenate(valid)) if valid else [], dtype=np.float32
        ).reshape(-1, 1)
        responses = []
        at = 0
        for request_rows in rows:
            if not np.isfinite(request_rows).all():
                error = pb_utils.TritonError("a row has a non-finite value")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            n = request_rows.shape[0]
            block = torch.from_numpy(np.ascontiguousarray(scores[at : at + n]))
            at += n
            tensor = pb_utils.Tensor.from_dlpack("scores", _to_dlpack(block))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
