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
from tests.server.conftest import OPERATOR_TOKEN, TOKENS, VIEWER, buy, decision_stub

pytestmark = pytest.mark.integration


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found on PATH (apt-get install openssl)")
    path = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=decision test CA", "-keyout", "ca.key", "-out", "ca.pem",
             cwd=path)  # fmt: skip
    _signed("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n", path)
    _signed("oncall", "/CN=oncall", "extendedKeyUsage=clientAuth\n", path)
    (path / "operator.token").write_text(OPERATOR_TOKEN + "\n")
    return path


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
