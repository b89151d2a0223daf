"""The images, built and run with podman on a machine without a container registry.

``python -m k8s.podman images [NAME...]`` (make images) makes the Debian base when it is
missing or its recipe changed (mmdebstrap, then ``podman import``), then builds the images
of k8s/images/ on it, tagged ``localhost/NAME:local`` and ``localhost/NAME:VERSION``.
``pod`` (make k8s-run) plays the decision pod from the local overlay's rendered manifests
(``local_pod``) until Ctrl-C or SIGTERM. ``sbom NAME`` writes the CycloneDX SBOM of an
image's Python environment (the release workflow's step, with ``--engine docker``).
``check()`` (make test-images: tests/images) starts a model server's image alone, as
Kubernetes runs it (its own non-root uid, a read-only root file system, writable folders
on tmpfs), until it says its model is ready on the Open Inference Protocol.

podman reads the project's containers.conf (k8s/images/containers.conf): runc, cgroupfs,
and the rlimits a container may have on these machines. Builds use the host's network and
the package index, local wheels and CA bundle ``make setup`` uses (pip's settings, passed
as build arguments; local folders mounted read-only).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.processes import free_port
from k8s.render import LOCAL_OVERLAY, Object, find, one, pod_spec, render_overlay

REPO = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO / "k8s" / "images"
CONTAINERS_CONF = IMAGES_DIR / "containers.conf"
PYTHON = REPO / ".venv" / "bin" / "python"
MODELS = REPO / ".run" / "models"
LOCAL_TAG = "local"  # what the local overlay (k8s/overlays/local) names

# The local base: Debian's own Python (3.11 in bookworm, as the lock's wheels need) on a
# minimal Debian, with the security and point-release updates of the day it is made.
BASE_IMAGE = "localhost/decision-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
RECIPE_LABEL = "decision.base.recipe"
# Debian packages of the same names; netavark (podman's network) runs iptables, which
# Debian's podman only suggests.
TOOLS = ("podman", "runc", "mmdebstrap", "catatonit", "iptables")
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "cert")


@dataclass(frozen=True)
class Image:
    name: str
    uid: int
    models: bool  # bakes the archives in (make models first)
    # The model it serves alone, and the OIP service that answers for it (check).
    model: str | None = None
    oip_service: str = "inference.GRPCInferenceService"
    writable: tuple[str, ...] = ("/tmp",)  # the emptyDirs its pod mounts
    venv: str = "/opt/venv"  # the Python environment its SBOM lists

    @property
    def dockerfile(self) -> Path:
        return IMAGES_DIR / f"{self.name}.Dockerfile"


IMAGES = {
    image.name: image
    for image in (
        Image("decision-server", 10001, models=False, writable=("/tmp", "/var/lib/decision")),
        Image(
            "model-server",
            10002,
            models=True,
            model="champion",
            oip_service="org.pytorch.serve.grpc.openinference.GRPCInferenceService",
            writable=("/tmp", "/var/run/model-server"),
        ),
        Image("triton-server", 10004, models=True, model="champion"),
        Image("mlserver-challenger", 10003, models=True, model="challenger", venv="/opt/mlserver"),
    )
}


class ImageError(Exception):
    """A tool is missing or a build or check failed; the message says which and why."""


def environment() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, capture: bool = False) -> str:
    """Runs podman with the project's containers.conf; its output when ``capture``."""
    result = subprocess.run(
        ["podman", *args],
        env=environment(),
        stdout=subprocess.PIPE if capture else None,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ImageError(f"podman {' '.join(args[:2])} failed (exit {result.returncode})")
    return result.stdout or ""


def remove(*args: str) -> None:
    """``podman *args`` for a cleanup: what it removes may already be gone, and a failure
    here must not hide the error that led to it."""
    subprocess.run(["podman", *args], env=environment(), stdout=subprocess.DEVNULL, check=False)


def require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"missing: {' '.join(missing)} (Debian: apt-get install {' '.join(missing)}; "
            "make images installs them when run as root)"
        )


def image_exists(ref: str) -> bool:
    return (
        subprocess.run(
            ["podman", "image", "exists", ref], env=environment(), check=False
        ).returncode
        == 0
    )


def base_recipe() -> str:
    text = json.dumps([BASE_PACKAGES, BASE_SOURCES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base() -> None:
    """The Debian base, made again when its recipe changed. ``podman rmi`` it to take the
    day's security updates."""
    recipe = base_recipe()
    if image_exists(BASE_IMAGE):
        inspect = ("image", "inspect", "--format", "{{json .Labels}}", BASE_IMAGE)
        labels = podman(*inspect, capture=True)
        if (json.loads(labels) or {}).get(RECIPE_LABEL) == recipe:
            return
    print(f"images: making the Debian base {BASE_IMAGE} (mmdebstrap, about a minute)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "base.tar"
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
             "bookworm", str(tarball), *BASE_SOURCES],
            check=True,
        )  # fmt: skip
        podman(
            "import",
            "--change", f"LABEL {RECIPE_LABEL}={recipe}",
            "--change", 'CMD ["/bin/bash"]',
            str(tarball), BASE_IMAGE,
        )  # fmt: skip


def pip_settings() -> dict[str, str]:
    """The pip settings ``make setup`` installs with (its config files and PIP_*
    variables), by setting name: what the image builds are given."""
    listed = subprocess.run(
        [str(PYTHON), "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1]
        if name in PIP_SETTINGS:
            settings[name] = value.strip().strip("'\"")
    for name in PIP_SETTINGS:
        variable = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if variable:
            settings[name] = variable
    return settings


def local_paths(settings: dict[str, str]) -> list[Path]:
    """The folders and files the settings name on this machine (mounted read-only). A
    local index's folder with its parent: its pages may link to files beside it."""
    paths = []
    for name, value in settings.items():
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                paths.append(path.parent if name.endswith("index-url") else path)
    return paths


def build_version() -> tuple[str, str]:
    """This tree's version (setuptools-scm: the tag, or how far past it) and commit."""
    version = subprocess.run(
        [str(PYTHON), "-m", "setuptools_scm"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    return version, revision


def model_versions() -> dict[str, str]:
    versions = {}
    for model in ("champion", "challenger"):
        archive = MODELS / f"{model}.mar"
        if not archive.exists():
            raise ImageError(f"{archive.relative_to(REPO)} is missing: run make models first")
        versions[model.upper() + "_VERSION"] = subprocess.run(
            [str(PYTHON), "-m", "torchserve.archive", "version", str(archive)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    return versions


def image_tag(version: str) -> str:
    return version.replace("+", "-")  # an image tag admits no "+"


def build(image: Image, version: str, revision: str) -> None:
    settings = pip_settings()
    args = {"VERSION": version, "REVISION": revision}
    args |= {"PIP_" + name.upper().replace("-", "_"): value for name, value in settings.items()}
    if image.models:
        args |= model_versions()
    volumes = [f"--volume={path}:{path}:ro" for path in local_paths(settings)]
    started = time.monotonic()
    print(f"images: building {image.name} {version}", flush=True)
    podman(
        "build",
        # OCI: no HEALTHCHECK (a Docker image's field). Kubernetes ignores it, and podman
        # 4.3 runs it from systemd timers: without systemd, a pod's init container with
        # one is never seen to finish. The Dockerfiles keep theirs for docker build.
        "--format", "oci",
        "--network", "host",
        "--file", str(image.dockerfile),
        "--tag", f"localhost/{image.name}:{LOCAL_TAG}",
        "--tag", f"localhost/{image.name}:{image_tag(version)}",
        *[f"--build-arg={key}={value}" for key, value in args.items()],
        *volumes,
        str(REPO),
    )  # fmt: skip
    print(f"images: {image.name} built in {time.monotonic() - started:.0f} s", flush=True)


def build_images(names: Sequence[str]) -> None:
    require_tools()
    ensure_base()
    version, revision = build_version()
    for name in names:
        build(IMAGES[name], version, revision)


@contextlib.contextmanager
def container(image: Image, *publish: int) -> Iterator[tuple[str, dict[int, int]]]:
    """The image's container as a pod runs it: its own uid (the image's USER), a read-only
    root file system, its writable folders on tmpfs, no capabilities; the id and the
    loopback port each container port is published on. Removed on leaving."""
    ports = {port: free_port() for port in publish}
    # Owned by the container's user, as the pod's fsGroup makes its emptyDirs writable.
    tmpfs = [
        f"--mount=type=tmpfs,destination={path},tmpfs-size=512m,chown=true"
        for path in image.writable
    ]
    name = f"decision-check-{image.name}-{secrets.token_hex(4)}"  # removed even if run fails
    try:
        podman(
            "run", "--detach", "--name", name, "--read-only", "--read-only-tmpfs=false",
            "--cap-drop=ALL", "--security-opt=no-new-privileges",
            "--no-healthcheck",  # podman runs health checks from systemd timers: none here
            *tmpfs,
            *[f"--publish=127.0.0.1:{host}:{port}" for port, host in ports.items()],
            f"localhost/{image.name}:{LOCAL_TAG}",
            capture=True,
        )  # fmt: skip
        yield name, ports
    finally:
        remove("rm", "--force", "--ignore", "--time", "10", name)


def container_user(container_id: str) -> str:
    return podman("exec", container_id, "id", "-u", capture=True).strip()


def check(image: Image, timeout_s: float = 180.0) -> float:
    """Starts the model server's image alone and waits until its model is ready on OIP;
    the seconds that took. Raises ImageError otherwise."""
    from torchserve.mlserver import model_ready

    if image.model is None:
        raise ImageError(f"{image.name} serves no model of its own to check")
    started = time.monotonic()
    with container(image, 7070) as (container_id, ports):
        address = f"127.0.0.1:{ports[7070]}"
        while not model_ready(address, image.model, image.oip_service):
            state = podman("inspect", "--format", "{{.State.Running}}", container_id, capture=True)
            if state.strip() != "true" or time.monotonic() - started > timeout_s:
                logs = podman("logs", "--tail", "30", container_id, capture=True)
                raise ImageError(f"{image.name}: {image.model} never ready on OIP\n{logs}")
            time.sleep(1)
        uid = container_user(container_id)
        if uid != str(image.uid):
            raise ImageError(f"{image.name} runs as uid {uid}, not {image.uid}")
    return time.monotonic() - started


def sbom(image: Image, ref: str, out: Path, engine: str = "podman") -> None:
    """The CycloneDX SBOM (JSON) of the image ``ref``'s Python environment, by
    cyclonedx-py: the environment is copied out of a container made (not started) from the
    image, and read with this machine's Python of the same minor version. ``engine``:
    podman here, docker in the release workflow (the same commands)."""
    run = functools.partial(subprocess.run, env=environment(), check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="sbom-") as tmp:
        container_id = run([engine, "create", ref], text=True).stdout.strip()
        try:
            run([engine, "cp", f"{container_id}:{image.venv}", f"{tmp}/venv"])
        finally:
            run([engine, "rm", container_id])
        venv = Path(tmp) / "venv"
        # Its interpreter links to the image's; this machine's (3.11 too) reads it instead.
        host_python = Path(sys.executable).resolve()
        for link in (venv / "bin").glob("python*"):
            link.unlink()
            link.symlink_to(host_python)
        config = (venv / "pyvenv.cfg").read_text().splitlines()
        home = [
            f"home = {host_python.parent}" if line.startswith("home") else line for line in config
        ]
        (venv / "pyvenv.cfg").write_text("\n".join(home) + "\n")
        subprocess.run(
            [str(Path(sys.executable).with_name("cyclonedx-py")), "environment",
             "--of", "JSON", "--output-reproducible", "-o", str(out), str(venv / "bin" / "python")],
            check=True,
        )  # fmt: skip


# The local pod (k8s/overlays/local): its name, the Deployments composed into it (the
# decision pod first: its pod-level settings are the pod's), the ports published on
# loopback (container port by name), and the images only it runs.
POD_NAME = "decision-local"
POD_DEPLOYMENTS = (
    "decision", "feature-cache", "redis", "market-data-broker", "market-data-replayer",
)  # fmt: skip
POD_PORTS = ("grpc", "admin", "metrics-0", "redis", "ts-rest")
LOCAL_OVERLAY_DIR = REPO / "k8s" / "overlays" / LOCAL_OVERLAY


@dataclass(frozen=True)
class LocalImage:
    """An image only the local pod runs: its Containerfile in the local overlay, built
    from ``context`` with ``ignore`` (a .dockerignore) at each play; podman's layer cache
    makes that a few seconds once built."""

    ref: str
    containerfile: str
    context: Path = LOCAL_OVERLAY_DIR
    ignore: str | None = None


LOCAL_IMAGES = (
    LocalImage("localhost/decision-redis:local", "redis.Containerfile"),
    LocalImage(  # localkafka on the decision-server image: after it, whenever it changes
        "localhost/decision-broker:local", "broker.Containerfile", REPO, "broker.containerignore"
    ),
)


def secret_values(objects: list[Object]) -> dict[tuple[str, str], str]:
    return {
        (secret["metadata"]["name"], key): base64.b64decode(value).decode()
        for secret in find(objects, "Secret")
        for key, value in secret.get("data", {}).items()
    }


def exec_probe(probe: Object, ports: dict[str, int]) -> Object:
    """A gRPC or HTTP probe as the command podman runs (it has neither, and the images
    have no curl): the server's own decision-probe, or Python's urllib."""
    timing = {k: v for k, v in probe.items() if k not in ("grpc", "httpGet", "exec")}
    if "grpc" in probe:
        port = probe["grpc"]["port"]
        command = ["decision-probe", f"127.0.0.1:{port}"]
        if probe["grpc"].get("service"):
            command += ["--service", probe["grpc"]["service"]]
    elif "httpGet" in probe:
        port = probe["httpGet"]["port"]
        number = ports.get(port, port)
        url = f"http://127.0.0.1:{number}{probe['httpGet']['path']}"
        command = ["python", "-c", f"import urllib.request as u; u.urlopen({url!r}, timeout=2)"]
    else:
        return probe
    return {"exec": {"command": command}, **timing}


def composed_spec(objects: list[Object]) -> Object:
    """The pod specs of ``POD_DEPLOYMENTS`` as one: one network namespace, so each container
    reaches the others on 127.0.0.1 as a cluster's Services would route; the volumes of the
    Deployments after the first are named after their Deployment."""
    spec = copy.deepcopy(pod_spec(one(objects, "Deployment", POD_DEPLOYMENTS[0])))
    for deployment in POD_DEPLOYMENTS[1:]:
        other = copy.deepcopy(pod_spec(one(objects, "Deployment", deployment)))
        renamed = {v["name"]: f"{deployment}-{v['name']}" for v in other.get("volumes", [])}
        containers = [*other.get("initContainers", []), *other["containers"]]
        for mount in (m for c in containers for m in c.get("volumeMounts", [])):
            mount["name"] = renamed[mount["name"]]
        spec.setdefault("initContainers", []).extend(other.get("initContainers", []))
        spec["containers"].extend(other["containers"])
        spec.setdefault("volumes", []).extend(
            {**v, "name": renamed[v["name"]]} for v in other.get("volumes", [])
        )
    return spec


def pod_manifest(
    objects: list[Object], token: str, host_ports: dict[str, int], redis_password: str
) -> Object:
    """The ``POD_DEPLOYMENTS`` as one pod that podman 4.3's kube play takes: native sidecars
    become ordinary containers (it predates them: the sidecar starts beside the server, not
    before it, and the server waits for it as it does at any start); environment from the
    ConfigMap and Secrets written in (kube play would need them created first), the pod's
    IP as loopback, the admin token ``token``, Redis's ``redis_password`` (its server's
    and the URL's); gRPC and HTTP probes as commands; emptyDirs
    as the tmpfs volumes ``volumes`` makes; the named ports in ``host_ports`` published on
    loopback; restarts on failure only."""
    spec = composed_spec(objects)
    configs = {cm["metadata"]["name"]: cm.get("data", {}) for cm in find(objects, "ConfigMap")}
    from_secrets = secret_values(objects)
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    spec["initContainers"] = [c for c in spec.get("initContainers", []) if c not in sidecars]
    spec["containers"] = [*sidecars, *spec["containers"]]
    for container in [*spec["initContainers"], *spec["containers"]]:
        container.pop("restartPolicy", None)
        container.pop("lifecycle", None)  # preStop: nothing routes to this pod to drain
        env: list[Object] = []
        for source in container.pop("envFrom", []):
            if "configMapRef" not in source:
                raise ImageError(f"{container['name']}: envFrom {source} is not written in")
            data = configs[source["configMapRef"]["name"]]
            env += [{"name": k, "value": v} for k, v in sorted(data.items())]
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                if ref["name"] == "decision-admin-tokens":  # made here, never in the repo
                    value = f"oncall operator {token}"
                else:
                    value = from_secrets[(ref["name"], ref["key"])]
                    value = value.replace("redis://", f"redis://:{redis_password}@", 1)
                var = {"name": var["name"], "value": value}
            elif "fieldRef" in source:
                var = {"name": var["name"], "value": "127.0.0.1"}
            else:
                var = {**var, "value": var.get("value", "").replace("$(POD_IP)", "127.0.0.1")}
            env.append(var)
        if env:
            container["env"] = env
        if container["name"] == "redis":  # reachable on the pod's address: a password
            container["args"] = [*container.get("args", []), "--requirepass", redis_password]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in container:
                container[kind] = exec_probe(container[kind], ports)
        for port in container.get("ports", []):
            if port.get("name") in host_ports:
                port["hostPort"] = host_ports[port["name"]]
                port["hostIP"] = "127.0.0.1"
    for volume in spec.get("volumes", []):
        if "emptyDir" in volume:
            volume.pop("emptyDir")
            volume["persistentVolumeClaim"] = {"claimName": f"{POD_NAME}-{volume['name']}"}
    # podman 4.3 applies the pod's policy to init containers too: with Always it starts a
    # finished one again and fails to remove it (podman issue 16343). A container that
    # fails is still restarted; one stopped on purpose stays stopped, as with Always.
    spec["restartPolicy"] = "OnFailure"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD_NAME, "labels": {"app.kubernetes.io/name": "decision-server"}},
        "spec": spec,
    }


def volume_names(manifest: Object) -> list[str]:
    return [
        volume["persistentVolumeClaim"]["claimName"]
        for volume in manifest["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    ]


def volumes(manifest: Object) -> None:
    """Creates a tmpfs volume for each of the pod's emptyDirs (every container of the pod
    may write them, as the pod's fsGroup does)."""
    for claim in volume_names(manifest):
        podman("volume", "rm", "--force", claim, capture=True)
        podman(
            "volume", "create", "--driver", "local", "--opt", "type=tmpfs",
            "--opt", "device=tmpfs", "--opt", "o=mode=1777", claim,
            capture=True,
        )  # fmt: skip


@dataclass
class LocalPod:
    """The decision pod played by podman from the local overlay; ``ports``: the loopback
    port each published container port is on; the admin token and Redis's password,
    both made when it was played."""

    manifest: Object
    ports: dict[str, int]
    token: str
    redis_password: str

    def container(self, name: str) -> str:
        return f"{POD_NAME}-{name}"  # how kube play names a pod's containers


def build_local_images() -> None:
    for image in LOCAL_IMAGES:
        ignore = ["--ignorefile", str(LOCAL_OVERLAY_DIR / image.ignore)] if image.ignore else []
        podman(
            "build", "--format", "oci", "--network", "host", "--quiet", *ignore,
            "--file", str(LOCAL_OVERLAY_DIR / image.containerfile), "--tag", image.ref,
            str(image.context),
            capture=True,
        )  # fmt: skip


@contextlib.contextmanager
def local_pod() -> Iterator[LocalPod]:
    """Plays the decision pod (after ``make images``); removes it and its volumes on
    leaving."""
    require_tools()
    for name in ("decision-server", "model-server"):
        if not image_exists(f"localhost/{name}:{LOCAL_TAG}"):
            raise ImageError(f"localhost/{name}:{LOCAL_TAG} is missing: run make images first")
    build_local_images()
    token, redis_password = secrets.token_urlsafe(24), secrets.token_hex(16)
    host_ports = {name: free_port() for name in POD_PORTS}
    manifest = pod_manifest(render_overlay(LOCAL_OVERLAY), token, host_ports, redis_password)
    pod = LocalPod(manifest, host_ports, token, redis_password)
    try:
        volumes(manifest)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="decision-pod-") as file:
            yaml.safe_dump(manifest, file, sort_keys=False)
            file.flush()
            podman("kube", "play", "--replace", file.name, capture=True)
        yield pod
    finally:
        remove("pod", "rm", "--force", "--ignore", "--time", "10", POD_NAME)
        for volume in volume_names(manifest):
            remove("volume", "rm", "--force", volume)


def run_pod() -> None:
    """make k8s-run: plays the pod and says how to reach it, until Ctrl-C."""
    with local_pod() as pod:
        print(
            f"""decision pod {POD_NAME} (podman kube play, k8s/overlays/local):
  Decide:   127.0.0.1:{pod.ports["grpc"]} (decision_client.connect)
  Admin:    127.0.0.1:{pod.ports["admin"]} (token {pod.token})
  Metrics:  http://127.0.0.1:{pod.ports["metrics-0"]}/metrics
  Market data: generated by {pod.container("replayer")}, through {pod.container("broker")}
    and {pod.container("feature-cache")} into {pod.container("redis")}
  Sidecar:  podman stop {pod.container("torchserve")} (readiness goes NOT_SERVING)
Ctrl-C removes the pod.""",
            flush=True,
        )
        # Blocked, so that either is waited for here, and the pod removed on leaving.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m k8s.podman", description=__doc__)
    parser.add_argument("command", choices=("images", "pod", "sbom"))
    parser.add_argument("names", nargs="*", choices=[*IMAGES, []], metavar="NAME")
    parser.add_argument("--ref", help="sbom: the image (default localhost/NAME:local)")
    parser.add_argument("--engine", default="podman", choices=("podman", "docker"))
    parser.add_argument("-o", "--out", type=Path, help="sbom: the file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "images":
            build_images(args.names or list(IMAGES))
        elif args.command == "sbom":
            (name,) = args.names
            ref = args.ref or f"localhost/{name}:{LOCAL_TAG}"
            sbom(IMAGES[name], ref, args.out or Path(f"{name}.cdx.json"), args.engine)
        else:
            run_pod()
    except (ImageError, subprocess.CalledProcessError) as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
