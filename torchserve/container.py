"""``python -m torchserve.container ROLE``: one TorchServe replica in a container.

The model-server image (``k8s/images/model-server.Dockerfile``) runs this as its entry
point, so the three roles share one image and one config with the local stack: the
template ``replicas/replica.properties`` and the role's committed model section
(``primary``, ``secondary``, ``challenger``), with every replica on the same ports (7070
gRPC inference, 8080 REST inference (the probes), 8082 metrics; each role is a pod of
its own, or the primary a sidecar of a decision pod) and the inference and metrics APIs
bound to ``0.0.0.0`` for the kubelet's probes, the decision pods and Prometheus.

The config, TorchServe's temp files and its logs go under ``--run-dir`` (an emptyDir:
the image's root file system is read-only). This process stays as the container's PID 1
and passes SIGTERM and SIGINT on to TorchServe's whole process group (``supervise``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-server", description=__doc__)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--model-store", type=Path, default=Path("/opt/models"))
    parser.add_argument("--run-dir", type=Path, default=Path("/var/run/model-server"))
    args = parser.parse_args(argv)
    command, env = prepare(args.role, args.model_store, args.run_dir)
    # The run folder is the JVM's working directory: its gc.log goes to logs/ there.
    sys.exit(supervise(command, env, args.run_dir))


if __name__ == "__main__":
    main()
