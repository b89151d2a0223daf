"""``make k8s-validate``: every overlay rendered by real kustomize and every object
validated strictly (an unknown field is an error) against Kubernetes' own schemas, the
Prometheus Operator's CRDs or Strimzi's KafkaTopic (``CUSTOM_SCHEMAS``); the alert rules
checked and unit-tested by ``promtool`` (``k8s.alert_rules``); the Dockerfiles under
``images/`` linted by hadolint. A kind with no schema is an error, never skipped. Exit
status 1 on any problem. The schemas' versions: docs/kubernetes.md.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate

from k8s.alert_rules import check_adapter_queries, run_promtool
from k8s.render import (
    ADAPTER_CONFIG,
    K8S_DIR,
    KUBERNETES_VERSION,
    LOCAL_OVERLAY,
    MONITORING_FILES,
    OVERLAYS,
    TOPICS,
    Object,
    RenderError,
    load,
    render,
)

SCHEMAS_DIR = K8S_DIR / "schemas"


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties refusing any other: the
    strictness kubernetes-validate's ``--strict`` schemas have."""
    if isinstance(schema, dict):
        out = {key: closed(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


@functools.cache
def prometheus_operator_schema(kind: str) -> dict[str, Any]:
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, kind)
    schema: dict[str, Any] = closed(model.model_json_schema(by_alias=True, mode="validation"))
    return schema


@functools.cache
def file_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / name).read_text())
    return schema


# The Prometheus Operator's kinds: JSON schemas made from the typed models of its CRDs in
# cloudcoil-models-prometheus-operator (its version names the operator's), closed here.
# Strimzi's KafkaTopic and sigstore's ClusterImagePolicy: no registry package ships their
# CRDs, so their schemas are written from Strimzi's API reference and sigstore's CRD.
# Every other kind: kubernetes-validate's schemas of Kubernetes KUBERNETES_VERSION.
CUSTOM_SCHEMAS: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): lambda: prometheus_operator_schema(
        "ServiceMonitor"
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): lambda: prometheus_operator_schema("PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): lambda: prometheus_operator_schema(
        "PrometheusRule"
    ),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): lambda: file_schema("kafkatopic-v1beta2.json"),
    ("policy.sigstore.dev/v1beta1", "ClusterImagePolicy"): lambda: file_schema(
        "clusterimagepolicy-v1beta1.json"
    ),
}


def deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The cause that names the field. Every optional field of the operator's models is
    an anyOf (its type, or null), whose own message would quote the whole value: follow
    the sub-errors to the deepest place in the object."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def problems(obj: Object) -> Iterator[str]:
    """What is wrong with one rendered object, in words; nothing when it is valid."""
    kind, api_version = obj.get("kind", "?"), obj.get("apiVersion", "?")
    custom = CUSTOM_SCHEMAS.get((api_version, kind))
    if custom is not None:
        validator = jsonschema.Draft202012Validator(custom())
        for error in validator.iter_errors(obj):
            cause = deepest(error)
            where = "/".join(str(p) for p in cause.absolute_path) or "(root)"
            yield f"{where}: {cause.message[:300]}"
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        yield f"no schema for {api_version} {kind} in Kubernetes {KUBERNETES_VERSION}"
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        yield f"{where}: {exc.message}"


def validate_kustomization(name: str, folder: Path, *, rules: bool = False) -> list[str]:
    """The objects' problems; with ``rules``, also promtool's on their alert rules."""
    try:
        objects = render(folder)
    except RenderError as exc:
        return [str(exc)]
    found = validate_objects(name, objects)
    if rules:
        found += check_alert_rules(name, objects)
    return found


def check_alert_rules(name: str, objects: list[Object]) -> list[str]:
    try:
        runs = run_promtool(objects)
    except RenderError as exc:
        return [f"{name}: {exc}"]
    for run in runs:
        print(f"{name}: promtool {run.step}: {'ok' if run.ok else f'exit {run.returncode}'}")
    return [f"{name}: promtool {r.step}: {r.output.strip()}" for r in runs if not r.ok]


def validate_objects(name: str, objects: list[Object]) -> list[str]:
    found: list[str] = []
    for obj in objects:
        label = f"{name}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        found.extend(f"{label}: {problem}" for problem in problems(obj))
    print(f"{name}: {len(objects)} objects, {len(found)} problems")
    return found


def lint_dockerfiles() -> list[str]:
    hadolint = Path(sys.executable).with_name("hadolint")
    dockerfiles = sorted((K8S_DIR / "images").glob("*.Dockerfile"))
    dockerfiles += sorted((K8S_DIR / "overlays").glob("*/*.Containerfile"))
    result = subprocess.run(  # noqa: S603 - our own hadolint, our own files
        [str(hadolint), *map(str, dockerfiles)], capture_output=True, text=True, check=False
    )
    print(f"hadolint: {len(dockerfiles)} Dockerfiles and Containerfiles, exit {result.returncode}")
    return [] if result.returncode == 0 else result.stdout.strip().splitlines()


def check_adapter() -> list[str]:
    """The prometheus-adapter rules' PromQL, as the adapter expands it, checked and unit-tested
    by promtool (monitoring/adapter-rules-test.yaml)."""
    (config,) = load(ADAPTER_CONFIG)
    run = check_adapter_queries(config)
    print(f"{ADAPTER_CONFIG}: promtool {run.step}: {'ok' if run.ok else f'exit {run.returncode}'}")
    return [] if run.ok else [f"{ADAPTER_CONFIG}: {run.output.strip()}"]


def main() -> int:
    print(f"validating against Kubernetes {KUBERNETES_VERSION} (strict)")
    found = [
        p
        for overlay in OVERLAYS
        for p in validate_kustomization(overlay, K8S_DIR / "overlays" / overlay, rules=True)
    ]
    found += validate_kustomization(LOCAL_OVERLAY, K8S_DIR / "overlays" / LOCAL_OVERLAY)
    found += validate_kustomization(TOPICS, K8S_DIR / TOPICS)
    found += [p for path in MONITORING_FILES for p in validate_objects(path, load(path))]
    found += check_adapter()
    found += lint_dockerfiles()
    for problem in found:
        print(f"  {problem}")
    print("k8s-validate: ok" if not found else f"k8s-validate: {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
