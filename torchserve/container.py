"""``python -m torchserve.container ROLE``: one TorchServe replica in a container.

The model-server image (``k8s/images/model-server.Dockerfile``) runs this as its entry
point, so the three roles share one image and one config with the local stack: the
template ``replicas/replica.properties`` and the role's committed model section
(``primary``, ``secondary``, ``challenger``), with every replica on the same ports (7070
gRPC inference, 8080 REST inference with ``/ping``, 8082 metrics; each role is a pod of
its own, or the primary a sidecar of a decision pod) and the inference and metrics APIs
bound to ``0.0.0.0`` for the kubelet's probes, the decision pods and Prometheus.

The config, TorchServe's temp files and its logs go under ``--run-dir`` (an emptyDir:
the image's root file system is read-only); the process is replaced by TorchServe's own
(``exec``), so the container's signals reach it directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="model-server", description=__doc__)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--model-store", type=Path, default=Path("/opt/models"))
    parser.add_argument("--run-dir", type=Path, default=Path("/var/run/model-server"))
    args = parser.parse_args(argv)
    command, env = prepare(args.role, args.model_store, args.run_dir)
    os.environ.update(env)
    os.chdir(args.run_dir)  # the JVM's gc.log goes to logs/ under its working directory
    os.execv(command[0], command)  # noqa: S606 - replaces this process; the argv is ours


if __name__ == "__main__":
    main()
