"""``MetricsServer``: a Prometheus registry over HTTP, on a thread of its own; ``scrape``:
reading one, as Prometheus does (tests, benchmarks, reports).

prometheus_client's HTTP server; the registry is the caller's own (no global one), so two
components in one process never mix their metrics. Every registry served gets
``decision_build_info{version,revision}`` (``core.build``).
"""

from __future__ import annotations

import logging
import urllib.request
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Info, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from core.build import REVISION, VERSION

log = logging.getLogger(__name__)


class MetricsServer:
    """The /metrics endpoint; ``port`` 0 in settings turns it off."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        Info("decision_build", "The build this process runs.", registry=registry).info(
            {"version": VERSION, "revision": REVISION}
        )
        self._host = host
        self._requested_port = port
        self.port = 0
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> None:
        if self._requested_port == 0 or self._server is not None:
            return
        self._server, self._thread = start_http_server(
            self._requested_port, self._host, self.registry
        )
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# Sample values by (sample name, its labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample a /metrics endpoint serves now."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
