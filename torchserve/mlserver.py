"""The challenger on MLServer: a TorchServe deployment must be able to swap its model
server for another Open Inference Protocol server (TorchServe gets no more fixes).

``model_repository`` turns a model archive into an MLServer model repository: the
archive's serialized XGBoost model (``model.json``, which MLServer's XGBoost runtime
loads by that name) and a ``model-settings.json`` whose version is the archive's version
hash, so MLServer's answers carry the same version as TorchServe's. The test suite
serves it with a real MLServer (``tests/server/test_mlserver.py``);
``k8s/images/mlserver-challenger.Dockerfile`` builds an image from it
(``python -m torchserve.mlserver ARCHIVE FOLDER``).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import grpc

from core.processes import ManagedProcess
from proto.third_party.torchserve import open_inference_grpc_pb2 as oip_pb2
from torchserve.archive import archive_meta, archive_version

# MLServer's (and Triton's and KServe's) name of the OIP gRPC service.
MLSERVER_OIP_SERVICE = "inference.GRPCInferenceService"
XGBOOST_RUNTIME = "mlserver_xgboost.XGBoostModel"


def model_repository(archive: Path, folder: Path, *, model_name: str = "challenger") -> Path:
    """Writes ``folder/model_name/`` (model file and model-settings.json); returns it."""
    meta = archive_meta(archive)
    if meta.get("framework") != "xgboost":
        raise ValueError(f"{archive}: MLServer serves the XGBoost challenger, not {meta!r}")
    version = archive_version(archive)
    if version is None:
        raise ValueError(f"{archive}: no version hash")
    model_dir = folder / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as mar:
        (model_dir / "model.json").write_bytes(mar.read(meta["serialized_file"]))
    settings = {
        "name": model_name,
        "implementation": XGBOOST_RUNTIME,
        "parameters": {"uri": "./model.json", "version": version},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(settings, indent=1))
    return model_dir


def server_settings(
    folder: Path, *, host: str, grpc_port: int, http_port: int, metrics_port: int
) -> None:
    """MLServer's ``settings.json`` for the repository ``folder``. No worker pool
    (``parallel_workers`` 0): inference runs in the server process, which is how MLServer
    starts on a machine where its pool does not."""
    settings = {
        "host": host,
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=1))


def mlserver_process(executable: Path, folder: Path, log_path: Path) -> ManagedProcess:
    """``mlserver start FOLDER`` (not started)."""
    return ManagedProcess(
        "mlserver", [str(executable), "start", str(folder)], cwd=folder, log_path=log_path
    )


def model_ready(address: str, model_name: str, service: str = MLSERVER_OIP_SERVICE) -> bool:
    """Whether the server at ``address`` says the model is ready (OIP ``ModelReady`` of
    ``service``: TorchServe answers it under a package of its own)."""
    with grpc.insecure_channel(address) as channel:
        ready = channel.unary_unary(
            f"/{service}/ModelReady",
            request_serializer=oip_pb2.ModelReadyRequest.SerializeToString,
            response_deserializer=oip_pb2.ModelReadyResponse.FromString,
        )
        try:
            return bool(ready(oip_pb2.ModelReadyRequest(name=model_name), timeout=1.0).ready)
        except grpc.RpcError:
            return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchserve.mlserver", description=__doc__)
    parser.add_argument("archive", type=Path, help="the challenger's .mar")
    parser.add_argument("folder", type=Path, help="the model repository to write")
    parser.add_argument("--model-name", default="challenger")
    args = parser.parse_args(argv)
    model_repository(args.archive, args.folder, model_name=args.model_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
