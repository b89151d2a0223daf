"""TLS on both ports and mTLS on the admin port, end to end: a throwaway CA (openssl),
a server and a client certificate it signed, a decision server using them, and
decisionctl connecting with them."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from decision_client.v1 import admin_pb2, admin_pb2_grpc, decision_pb2
from server import probe
from server.admin import ctl
from server.app import DecisionApp
from tests.server.conftest import (
    OPERATOR_TOKEN,
    TOKENS,
    VIEWER,
    audited_decision,
    buy,
    decision_stub,
)

pytestmark = pytest.mark.integration

DESK = "spiffe://trading.example/desk-7"  # a caller's identity, its certificate's SAN


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(name: str, subject: str, extensions: str, cwd: Path) -> None:
    """``name``.key and ``name``.pem, signed by ca.pem."""
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=cwd)  # fmt: skip


def _ca_with_server(path: Path, name: str) -> Path:
    """``path`` with a CA named ``name`` and a server certificate it signed."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found on PATH (apt-get install openssl)")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", "ca.key", "-out", "ca.pem",
             cwd=path)  # fmt: skip
    _signed("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n", path)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _ca_with_server(tmp_path_factory.mktemp("pki"), "decision test CA")
    _signed("oncall", "/CN=oncall", "extendedKeyUsage=clientAuth\n", path)
    _signed("desk", "/CN=desk", f"subjectAltName=URI:{DESK}\nextendedKeyUsage=clientAuth\n", path)
    (path / "operator.token").write_text(OPERATOR_TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def renewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA and a server certificate it signed: what a renewal brings."""
    return _ca_with_server(tmp_path_factory.mktemp("renewed"), "decision renewed CA")


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_both_ports_speak_tls_and_admin_needs_a_client_certificate(
    start_app, pki: Path, capsys
) -> None:
    app: DecisionApp = await start_app(
        server={"tls_cert_file": str(pki / "server.pem"), "tls_key_file": str(pki / "server.key")},
        admin={"tokens": TOKENS, "tls_client_ca_file": str(pki / "ca.pem")},
    )
    ca = read(pki / "ca.pem")
    with_ca = grpc.ssl_channel_credentials(root_certificates=ca)
    with_client_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=read(pki / "oncall.key"),
        certificate_chain=read(pki / "oncall.pem"),
    )

    # DecisionService: TLS, no client certificate needed; plaintext is not spoken.
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", with_ca) as channel:
        response = await decision_stub(channel).Decide(buy(), timeout=5.0)
        assert response.decision_id
        assert response.decision != decision_pb2.DECISION_UNSPECIFIED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await decision_stub(channel).Decide(buy(), timeout=2.0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # AdminService: TLS without a client certificate fails the handshake; with one
    # the CA signed, the token decides as before.
    request = admin_pb2.GetStatusRequest()
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.admin_port}", with_ca) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                request, metadata=VIEWER, timeout=2.0
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.admin_port}", with_client_cert) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        status = await admin.GetStatus(request, metadata=VIEWER, timeout=5.0)
        assert status.server_id
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.GetStatus(request, timeout=5.0)  # a certificate is not a token
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # decisionctl, as on-call runs it (a blocking client: off the event loop).
    tls = ["--ca-file", str(pki / "ca.pem"), "--server-name", "localhost"]
    common = [
        "--address",
        f"127.0.0.1:{app.admin_port}",
        "--token-file",
        str(pki / "operator.token"),
    ]
    capsys.readouterr()
    code = await asyncio.to_thread(
        ctl.main,
        ["status", "--json", *common, *tls,
         "--cert-file", str(pki / "oncall.pem"), "--key-file", str(pki / "oncall.key")],
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["server_id"] == status.server_id
    code = await asyncio.to_thread(ctl.main, ["status", *common, *tls, "--timeout", "2"])
    assert code == 3, "no client certificate: the server is not reachable for this client"
    assert "127.0.0.1" in capsys.readouterr().err


async def test_the_probe_checks_health_over_tls(start_app, pki: Path) -> None:
    app: DecisionApp = await start_app(
        server={"tls_cert_file": str(pki / "server.pem"), "tls_key_file": str(pki / "server.key")},
    )
    address = f"127.0.0.1:{app.port}"
    tls = ["--ca-file", str(pki / "ca.pem"), "--server-name", "localhost"]
    assert await asyncio.to_thread(probe.main, [*tls, address]) == 0
    service = ["--service", "decision.v1.DecisionService"]
    assert await asyncio.to_thread(probe.main, [*tls, *service, address]) == 0
    # Plaintext to a TLS port is no answer: the probe fails.
    assert await asyncio.to_thread(probe.main, ["--timeout-s", "1", address]) == 1


async def handshakes(port: int, ca: Path) -> bool:
    """Whether a new connection trusting only ``ca`` completes its TLS handshake."""
    credentials = grpc.ssl_channel_credentials(root_certificates=read(ca))
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=2.0)
        except TimeoutError:
            return False
        return True


async def test_a_certificate_replaced_on_disk_is_served_without_a_restart(
    start_app, pki: Path, renewed: Path, tmp_path: Path
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki / "server.pem", cert)
    shutil.copy(pki / "server.key", key)
    app: DecisionApp = await start_app(
        server={"tls_cert_file": str(cert), "tls_key_file": str(key)}, admin={"tokens": TOKENS}
    )
    old = grpc.ssl_channel_credentials(root_certificates=read(pki / "ca.pem"))
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", old) as kept:
        stub = decision_stub(kept)
        answered: list[decision_pb2.DecideResponse] = []
        renewing = True

        async def calls() -> None:  # on a connection made before the renewal
            while renewing:
                answered.append(await stub.Decide(buy(), timeout=5.0))
                await asyncio.sleep(0.02)

        caller = asyncio.create_task(calls())
        await asyncio.sleep(0.2)
        # As a renewal may land: one file at a time (the key first, so for a moment the
        # pair does not match: the previous one is served meanwhile).
        for source, target in ((renewed / "server.key", key), (renewed / "server.pem", cert)):
            shutil.copy(source, target.with_suffix(".new"))
            target.with_suffix(".new").replace(target)
            if target == key:  # a key without its certificate: the old pair still served
                assert await handshakes(app.port, pki / "ca.pem")
        deadline = asyncio.get_running_loop().time() + 60
        while not await handshakes(app.port, renewed / "ca.pem"):
            assert asyncio.get_running_loop().time() < deadline, "renewal not served in 60 s"
            await asyncio.sleep(0.5)
        assert await handshakes(app.admin_port, renewed / "ca.pem")  # both ports
        assert not await handshakes(app.port, pki / "ca.pem")  # the old one is gone
        calls_before = len(answered)
        await asyncio.sleep(0.2)
        renewing = False
        await caller  # raises if a call on the kept connection failed
    assert len(answered) > calls_before > 0


async def test_with_a_client_ca_a_caller_is_who_its_certificate_says(start_app, pki: Path) -> None:
    app: DecisionApp = await start_app(
        server={
            "tls_cert_file": str(pki / "server.pem"),
            "tls_key_file": str(pki / "server.key"),
            "tls_client_ca_file": str(pki / "ca.pem"),
        },
    )
    ca = read(pki / "ca.pem")
    desk = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=read(pki / "desk.key"),
        certificate_chain=read(pki / "desk.pem"),
    )
    # Without a certificate the handshake fails: no call is taken.
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await decision_stub(channel).Decide(buy(), timeout=2.0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # With one, the caller is its identity; client_id stays the caller's own label, and
    # claiming another's changes nothing of who called.
    async with grpc.aio.secure_channel(f"127.0.0.1:{app.port}", desk) as channel:
        stub = decision_stub(channel)
        answers = [
            await stub.Decide(buy(client_id=label), timeout=5.0) for label in ("desk-7", "desk-1")
        ]
    for answer, label in zip(answers, ("desk-7", "desk-1"), strict=True):
        row = await audited_decision(app, answer.decision_id)
        assert (row["caller"], row["client_id"]) == (DESK, label)
    decided = app.metrics.registry.get_sample_value(
        "decision_caller_decisions_total", {"caller": DESK}
    )
    assert decided == 2
