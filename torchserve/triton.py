"""Triton Inference Server for both archives: ``python -m torchserve.triton``.

``repository FOLDER ARCHIVE...`` writes a Triton model repository from TorchServe archives:
per model, ``config.pbtxt`` (Python backend, dynamic batching, a queue policy) and ``1/``
holding ``triton_model.py`` beside the archive's own scorer, so Triton scores as TorchServe
does. ``serve FOLDER MODEL`` runs ``tritonserver`` (the nvidia-pytriton wheel's, ``make
setup-triton``) on one model of it. Triton answers version "1"; the decision server reports
the archive's hash (``DECISION_TORCHSERVE__MODEL_VERSION=archive``). See
docs/model-serving.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

from core.processes import ManagedProcess, niced
from torchserve.archive import archive_meta, archive_version
from torchserve.mlserver import MLSERVER_OIP_SERVICE, model_ready

TRITON_OIP_SERVICE = MLSERVER_OIP_SERVICE  # the OIP service's standard name
# Where .ci/setup --with-triton (and --with-test-tools) puts the wheel's server.
TRITON_ROOT = Path(__file__).resolve().parents[1] / ".tools/triton/pytriton/tritonserver"
MODEL_FILE = Path(__file__).with_name("triton_model.py")
# Triton refuses a request of more rows than this: the largest call the decision server
# sends is a whole DecideBatch (server.validation.MAX_BATCH_REQUESTS).
MAX_BATCH = 256
QUEUE_DELAY_US = 500  # what a lone request waits for others: a fraction of a model call
# A request waits in the queue no longer than its caller waits for it (the decision
# server sends each call's budget as the request's ``timeout``): past that it has been
# abandoned and is refused, not scored. A request may lower this ceiling, not raise it;
# one that names no timeout (a tool's) gets the ceiling.
QUEUE_TIMEOUT_MAX_US = 60_000_000

__all__ = [
    "TRITON_OIP_SERVICE",
    "TRITON_ROOT",
    "model_ready",
    "model_repository",
    "tritonserver_process",
]


def _config(model_name: str, width: int, instances: int, max_batch: int) -> str:
    return f"""name: "{model_name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "rows", data_type: TYPE_FP32, dims: [ {width} ] }} ]
output [ {{ name: "scores", data_type: TYPE_FP32, dims: [ 1 ] }} ]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {QUEUE_TIMEOUT_MAX_US}
    allow_timeout_override: true
  }}
}}
instance_group [ {{ count: {instances}, kind: KIND_CPU }} ]
"""


def model_repository(
    archive: Path,
    folder: Path,
    *,
    model_name: str | None = None,
    instances: int = 1,
    max_batch: int = MAX_BATCH,
) -> Path:
    """Writes ``folder/<model name>/`` from ``archive``; returns it. ``instances``: model
    instances Triton runs side by side, each a process (one per CPU given to it);
    ``max_batch``: the most rows one request may carry."""
    meta = archive_meta(archive)
    name = model_name or str(meta.get("model_name") or archive.stem)
    if archive_version(archive) is None:
        raise ValueError(f"{archive}: no version hash")
    version_dir = folder / name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as mar:
        for member in ("handler.py", "model-meta.json", meta["serialized_file"]):
            (version_dir / member).write_bytes(mar.read(member))
    shutil.copyfile(MODEL_FILE, version_dir / "model.py")
    # The stub's Python ignores PYTHONPATH: model.py puts these directories on sys.path.
    (version_dir / "python-path.txt").write_text("".join(f"{path}\n" for path in package_dirs()))
    config = _config(name, int(meta["input_width"]), instances, max_batch)
    (folder / name / "config.pbtxt").write_text(config)
    return folder / name


def package_dirs() -> list[str]:
    """The directories this interpreter imports packages from, in its order: its
    site-packages and what their ``.pth`` files add (a venv laid over another
    environment names that one's packages only there), not its standard library, which
    the stub's Python brings."""
    stdlib = sysconfig.get_paths()["stdlib"]  # a venv's is its base interpreter's
    standard = {stdlib, os.path.join(stdlib, "lib-dynload")}
    found = (os.path.abspath(entry) for entry in sys.path if entry)
    return list(dict.fromkeys(p for p in found if os.path.isdir(p) and p not in standard))


def backend_directory(triton_root: Path, work_dir: Path) -> Path:
    """A backend directory in ``work_dir`` whose Python backend has the stub built for
    this Python's minor version (the wheel ships one per version, beside the backend)."""
    backends = work_dir / "triton-backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    source = triton_root / "backends" / "python"
    stub = triton_root / "python_backend_stubs" / sysconfig.get_python_version()
    for item in source.iterdir():  # made anew: a folder kept across runs may be stale
        target = python / item.name
        target.unlink(missing_ok=True)
        target.symlink_to(item)
    # A copy, owned by whoever runs Triton: it sets the stub's execute bit at every model
    # load, which fails on a file of another user's (the image's, read-only, as uid 10004).
    # Its libraries are found through stub_environment (its rpath is relative to its own
    # place in the wheel).
    target = python / "triton_python_backend_stub"
    target.unlink(missing_ok=True)
    shutil.copy2(stub / "triton_python_backend_stub", target)
    return backends


def stub_environment(triton_root: Path) -> dict[str, str]:
    """tritonserver's environment: the stub copied out of the wheel (backend_directory)
    finds the wheel's bundled libraries through LD_LIBRARY_PATH."""
    libs = str(triton_root.parent.parent / "nvidia_pytriton.libs")
    inherited = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": f"{libs}:{inherited}" if inherited else libs}


def tritonserver_argv(
    triton_root: Path,
    folder: Path,
    work_dir: Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    host: str = "127.0.0.1",
    model: str = "",
) -> list[str]:
    """``tritonserver`` on the repository ``folder``, listening on ``host``; its backend
    directory is made in ``work_dir``. ``model``: load only that one (else every model
    in the repository)."""
    only = ["--model-control-mode=explicit", f"--load-model={model}"] if model else []
    return [
        str(triton_root / "bin" / "tritonserver"),
        f"--model-repository={folder}",
        f"--backend-directory={backend_directory(triton_root, work_dir)}",
        "--disable-auto-complete-config",
        *only,
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        "--exit-on-error=true",
    ]  # fmt: skip


def tritonserver_process(
    triton_root: Path,
    folder: Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    log_path: Path,
    niceness: int = 0,
    name: str = "tritonserver",
) -> ManagedProcess:
    """``tritonserver`` on the repository ``folder``, loopback only (not started).

    ``triton_root`` is the wheel's ``pytriton/tritonserver``; its backend directory is
    made beside ``log_path``."""
    argv = tritonserver_argv(
        triton_root,
        folder,
        log_path.parent,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
    )
    return ManagedProcess(
        name,
        niced(argv, niceness),
        cwd=folder,
        log_path=log_path,
        env=stub_environment(triton_root),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchserve.triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    repository = commands.add_parser("repository", help="write a model repository")
    repository.add_argument("folder", type=Path, help="the model repository to write")
    repository.add_argument("archives", type=Path, nargs="+", help="model archives (.mar)")
    repository.add_argument("--instances", type=int, default=1, help="instances per model")
    serve = commands.add_parser(
        "serve", help="run tritonserver on one model of a repository, on every interface"
    )
    serve.add_argument("folder", type=Path, help="the model repository")
    serve.add_argument("model", help="the model to serve: champion or challenger")
    serve.add_argument("--triton-root", type=Path, default=TRITON_ROOT)
    serve.add_argument("--work-dir", type=Path, default=Path("/tmp"), help="writable")  # noqa: S108
    serve.add_argument("--host", default="0.0.0.0")
    for name, port in (("grpc", 7070), ("http", 8080), ("metrics", 8082)):
        serve.add_argument(f"--{name}-port", type=int, default=port)
    args = parser.parse_args(argv)
    if args.command == "repository":
        for archive in args.archives:
            model = model_repository(archive, args.folder, instances=args.instances)
            print(f"{model}: version {archive_version(archive)}")
        return 0
    command = tritonserver_argv(
        args.triton_root,
        args.folder,
        args.work_dir,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        model=args.model,
    )
    env = stub_environment(args.triton_root)
    os.execve(command[0], command, env)  # noqa: S606 (tritonserver takes the process: PID 1)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
