"""The model-server image's entry point: the same template and role sections as the local
stack, with the APIs a pod's neighbours need bound to every interface."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Replica, wait_for
from torchserve.container import check_health, config_values, health_url, prepare
from torchserve.replica import PRIMARY_PORTS, config_properties, role_section


@pytest.mark.parametrize("role", ["primary", "secondary", "challenger"])
def test_a_role_gets_its_model_section_and_container_addresses(tmp_path: Path, role: str) -> None:
    argv, env = prepare(role, Path("/opt/models"), tmp_path)

    config_path = Path(argv[argv.index("--ts-config") + 1])
    assert config_path.parent == tmp_path
    config = config_values(config_path.read_text())
    assert config["inference_address"] == "http://0.0.0.0:8080"
    assert config["metrics_address"] == "http://0.0.0.0:8082"
    assert (config["grpc_inference_address"], config["grpc_inference_port"]) == ("0.0.0.0", "7070")
    # Management (register, scale, unregister models) never leaves the pod.
    assert config["management_address"] == "http://127.0.0.1:8081"
    assert config["grpc_management_address"] == "127.0.0.1"
    assert config["model_store"] == "/opt/models"
    assert config["models"] == config_values(role_section(role))["models"]
    assert argv[0].endswith("torchserve") and "--foreground" in argv
    assert argv[argv.index("--model-store") + 1] == "/opt/models"
    assert {env["TMPDIR"], env["LOG_LOCATION"]} == {str(tmp_path / "tmp"), str(tmp_path / "logs")}
    assert (tmp_path / "tmp").is_dir() and (tmp_path / "logs").is_dir()


@pytest.mark.parametrize(
    ("role", "model"),
    [("primary", "champion"), ("secondary", "champion"), ("challenger", "challenger")],
)
def test_the_health_check_asks_the_roles_model_over_loopback(
    tmp_path: Path, role: str, model: str
) -> None:
    argv, _ = prepare(role, Path("/opt/models"), tmp_path)
    config = Path(argv[argv.index("--ts-config") + 1]).read_text()
    assert health_url(config) == f"http://127.0.0.1:8080/predictions/{model}"


def test_the_health_check_without_a_config_says_so(tmp_path: Path) -> None:
    problem = check_health(tmp_path)
    assert problem is not None and str(tmp_path) in problem


@pytest.mark.integration
def test_the_health_check_passes_while_the_model_answers_and_fails_while_it_does_not(
    tmp_path: Path, replicas: dict[str, Replica]
) -> None:
    replica = replicas["secondary"]
    config = config_properties(replica.ports, tmp_path, role_section("secondary"))
    (tmp_path / "config.properties").write_text(config)
    assert check_health(tmp_path) is None
    replica.proc.pause()  # a replica that answers nothing, as one whose worker is lost
    try:
        problem = check_health(tmp_path, timeout_s=0.5)
    finally:
        replica.proc.resume()
    assert problem is not None and "/predictions/champion" in problem
    wait_for(lambda: check_health(tmp_path) is None)


def test_the_local_stack_keeps_every_address_on_loopback(tmp_path: Path) -> None:
    config = config_values(config_properties(PRIMARY_PORTS, tmp_path, role_section("primary")))
    addresses = [v for k, v in config.items() if k.endswith("_address")]
    assert len(addresses) == 5
    assert all("127.0.0.1" in address for address in addresses)


CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.write_text("terminated"), sys.exit(0)))
out.write_text("started")
time.sleep(30)
"""


def test_the_entry_point_passes_sigterm_to_torchserves_process_group(tmp_path: Path) -> None:
    """As PID 1 the supervisor must hand the kubelet's SIGTERM on: here a child that
    records the signal stands in for TorchServe's launcher and JVM."""
    out = tmp_path / "child.txt"
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from torchserve.container import supervise;"
            f" sys.exit(supervise([sys.executable, '-c', {CHILD!r}, {str(out)!r}], {{}},"
            f" Path({str(tmp_path)!r})))",
        ],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text() == "started"):
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        supervisor.send_signal(signal.SIGTERM)  # to the supervisor alone, as to PID 1
        assert supervisor.wait(timeout=10) == 0
        assert out.read_text() == "terminated"
    finally:
        supervisor.kill()
        supervisor.wait()
