"""TLS credentials that follow their files: a certificate renewed on disk (cert-manager
rewriting a Secret's volume) is served to new connections without a restart.

gRPC asks ``CertificateFiles.fetch`` at each new connection's handshake (dynamic server
credentials); it compares the files' identity (inode, size, modification time) with what
it served last, costing a few stats, and loads them again only when they changed. Files
that do not load (a key that does not match its certificate while one file is being
replaced, a CA bundle that does not parse) are logged and the previous ones kept, until
a file changes again.
Connections already open keep the certificate they were made with until they close
(``server.max_connection_age_s`` bounds that).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger(__name__)

FileVersion = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """A certificate chain, its key and, for mTLS, the CA bundle clients' certificates
    must chain to; read again whenever one of them changes."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self._paths = [Path(p) for p in (cert_file, key_file, client_ca_file) if p]
        self._cert, self._key = Path(cert_file), Path(key_file)
        self._client_ca = Path(client_ca_file) if client_ca_file else None
        self._lock = threading.Lock()  # gRPC's core threads may handshake together
        self._served: FileVersion = ()
        self.reloads = 0

    @property
    def mtls(self) -> bool:
        return self._client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask ``fetch`` at every handshake; raises when the
        files do not load now (a server must not start without its certificate)."""
        version = self._version()
        initial = self._load()
        self._served = version
        # gRPC documents None from the fetcher (keep the current); types-grpcio omits it.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=self.mtls
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The files' new configuration when they changed since last served, else None
        (gRPC keeps what it has)."""
        try:
            with self._lock:
                version = self._version()
                if version == self._served:
                    return None
                self._served = version  # tried once a version: a failure logs once
                config = self._load()
                if self._version() != version:  # changed while read: the next handshake
                    self._served = ()
                    return None
                self.reloads += 1
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("TLS files changed but do not load (%s); serving the previous ones", exc)
            return None
        log.info("TLS certificate reloaded from %s", self._cert)
        return config

    def _version(self) -> FileVersion:
        stats = [os.stat(p) for p in self._paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        key, chain = self._key.read_bytes(), self._cert.read_bytes()
        # The pair must match (ssl raises when the key is not the certificate's), and the
        # CA bundle parse: gRPC would keep the previous ones without a word.
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        client_ca = self._client_ca.read_bytes() if self._client_ca else None
        if client_ca is not None:
            context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
        return grpc.ssl_server_certificate_configuration([(key, chain)], client_ca)
