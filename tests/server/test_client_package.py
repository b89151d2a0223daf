"""decision-client as a caller gets it: its wheel, built from client/, installed alone in a
fresh virtualenv (with proto-plus, whose import name is ``proto``, beside it), calls a real
decision server blocking, asyncio, batched and streamed, and its trace context reaches the
audit record."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.server.conftest import audited_decision, replica_settings, sample_record

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What a caller installs beside the client (the done-when): proto-plus (import name
# ``proto``, as this repository's server-side package), the common protos, grpcio-status.
BESIDE = ("proto-plus", "googleapis-common-protos", "grpcio-status")
# Everything the fresh virtualenv may hold: the client, its dependencies and what they need.
ALLOWED = {
    "decision-client", "grpcio", "protobuf", "typing-extensions", "pip", "setuptools",
    *BESIDE,
}  # fmt: skip


def run(*args: str | Path, timeout_s: float = 180) -> str:
    """Runs outside the repository: ``python -c`` there would import its ``proto``."""
    done = subprocess.run(
        [str(a) for a in args],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the decision-client wheel and ``BESIDE``; its python."""
    root = tmp_path_factory.mktemp("client")
    # Built from a copy: setuptools reuses a build folder, which could ship stale modules.
    source = shutil.copytree(
        REPO / "client", root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", root / "dist", source)  # fmt: skip
    (wheel,) = (root / "dist").glob("decision_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert sorted(re.split("[<>=!~ ]", r)[0] for r in requires) == ["grpcio", "protobuf"]
    assert all(">=" in r and "<" in r for r in requires), requires  # ranges, not pins
    packages = {n.split("/")[0] for n in names if not n.startswith("decision_client-")}
    assert packages == {"decision_client"}, packages  # no server code
    run(sys.executable, "-m", "venv", root / "venv")
    python = root / "venv" / "bin" / "python"
    # The versions this tree's lock holds, so that the install needs only what is cached.
    run(python, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel, *BESIDE)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(
        run(python, "-m", "pip", "list", "--format", "json"))}  # fmt: skip
    assert installed <= ALLOWED, installed - ALLOWED
    return python


async def test_a_caller_with_only_the_client_package_gets_answers(
    client_venv, replicas, start_app, feature_writer
):
    await feature_writer.write_many([sample_record("BTC-USD"), sample_record("ETH-USD")])
    app = await start_app(torchserve=replica_settings(replicas))
    # proto-plus's ``proto`` imports beside the client: the two share an environment.
    run(client_venv, "-c", "import proto, decision_client; proto.Message")
    out = await asyncio.to_thread(
        run, client_venv, REPO / "client/examples/decide.py", "--target",
        f"127.0.0.1:{app.port}", "--timeout-s", "2",
    )  # fmt: skip
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["call"] for a in answers] == [
        "decide", "decide_batch", "decide_batch", "async decide", "stream decide",
    ]  # fmt: skip
    assert [a["request_id"] for a in answers] == ["b-1", "b-2", "b-3", "a-1", "s-1"]
    for answer in answers:
        assert answer["source"] == "SOURCE_PRIMARY", answer
        row = await audited_decision(app, answer["decision_id"])
        assert row["trace_id"] == answer["trace_id"]  # the caller's trace context, passed
