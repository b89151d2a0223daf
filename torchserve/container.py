"""``python -m torchserve.container ROLE``: one TorchServe replica in a container.

The model-server image's entry point (``k8s/images/model-server.Dockerfile``): the shared
replica template with ROLE's committed model section (primary, secondary, challenger), on
the same ports in every pod (7070 gRPC, 8080 REST, 8082 metrics) bound to 0.0.0.0. The
config, temp files and logs go under ``--run-dir`` (the root file system is read-only). It
stays PID 1, passes SIGTERM and SIGINT on to TorchServe and exits with its status (128 + N
after signal N). ``--check-health`` is the image's HEALTHCHECK: exit 0 while the replica's
model answers a prediction, else 1. Images and probes: docs/kubernetes.md#images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from torchserve.replica import ROLES, ReplicaPorts, config_properties, role_section

CONTAINER_PORTS = ReplicaPorts.from_base(7070, 8080, 9000)
BIND_ADDRESS = "0.0.0.0"  # a container's ports: NetworkPolicies restrict who reaches them


def prepare(role: str, model_store: Path, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Writes the role's config under ``run_dir``; TorchServe's argv and the environment
    variables it needs (its temp and log folders there too)."""
    tmp_dir, logs_dir = run_dir / "tmp", run_dir / "logs"
    for folder in (tmp_dir, logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.properties"
    config.write_text(
        config_properties(
            CONTAINER_PORTS, model_store, role_section(role), bind_address=BIND_ADDRESS
        )
    )
    argv = [
        str(Path(sys.executable).with_name("torchserve")),
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config", str(config),
        "--model-store", str(model_store),
    ]  # fmt: skip
    env = {
        "TMPDIR": str(tmp_dir),
        "TEMP": str(tmp_dir),
        "LOG_LOCATION": str(logs_dir),
        "METRICS_LOCATION": str(logs_dir),
    }
    return argv, env


def supervise(argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> int:
    """Runs ``argv`` in a process group of its own until it exits; SIGTERM and SIGINT are
    passed to the whole group. Returns its exit status (128 + N when signal N ended it).

    In a container this process is PID 1, and the kernel delivers a signal to PID 1
    only when it has a handler. TorchServe's launcher has none and waits on the JVM it
    starts: run as PID 1 it would never see the kubelet's SIGTERM, and the pod would be
    killed at the end of its grace period instead of stopping. The JVM and its workers
    share the launcher's group, so one signal to the group reaches all of them.
    """
    proc = subprocess.Popen(  # noqa: S603 - our own argv
        list(argv), env={**os.environ, **env}, cwd=cwd, process_group=0
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = proc.wait()
    return 128 - code if code < 0 else code


def config_values(config_text: str) -> dict[str, str]:
    """A ``config.properties`` file's ``key=value`` lines."""
    lines = (line.strip() for line in config_text.splitlines())
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def health_url(config_text: str) -> str:
    """Where a prediction request for the model the config loads (``load_models``:
    ``name=file.mar``) goes on the REST inference API, over loopback."""
    config = config_values(config_text)
    model = config["load_models"].split(",")[0].split("=")[0]
    address = urllib.parse.urlsplit(config["inference_address"])
    return f"http://127.0.0.1:{address.port}/predictions/{model}"


def check_health(run_dir: Path, timeout_s: float = 1.0) -> str | None:
    """None while the replica under ``run_dir`` answers a prediction request (a GET
    without rows: TorchServe's queue and worker answer it, with an error, 200), else why
    not. A request that times out closes its connection, which loses no worker. Not
    ``/ping``: TorchServe 0.12 answers it "Healthy" while a worker it lost is never
    started again."""
    try:
        url = health_url((run_dir / "config.properties").read_text())
    except (OSError, KeyError) as exc:
        return f"no replica config in {run_dir}: {exc!r}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 - loopback http
            return None
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except OSError as exc:  # refused, reset, timed out
        return f"{url}: {exc}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-server", description=__doc__)
    parser.add_argument("role", choices=ROLES, nargs="?")
    parser.add_argument("--model-store", type=Path, default=Path("/opt/models"))
    parser.add_argument("--run-dir", type=Path, default=Path("/var/run/model-server"))
    parser.add_argument(
        "--check-health",
        action="store_true",
        help="exit 0 while the running replica's model answers, else 1 (the HEALTHCHECK)",
    )
    args = parser.parse_args(argv)
    if args.check_health:
        problem = check_health(args.run_dir)
        sys.exit(None if problem is None else f"unhealthy: {problem}")  # a message exits 1
    if args.role is None:
        parser.error("a role is required: " + ", ".join(ROLES))
    command, env = prepare(args.role, args.model_store, args.run_dir)
    # The run folder is the JVM's working directory: its gc.log goes to logs/ there.
    sys.exit(supervise(command, env, args.run_dir))


if __name__ == "__main__":
    main()
