"""``python -m server`` / ``decision-server``: run the decision server until SIGTERM or SIGINT.

    decision-server                 one worker per core this process may use
    decision-server --workers 2     two worker processes sharing the ports
    decision-server --print-config  the settings it would run with, then exit

Settings come from ``DECISION_*`` environment variables (docs/configuration.md); ``--workers``
overrides ``DECISION_SERVER__WORKERS``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from core.logs import configure_logging
from core.settings import environment_lines, settings_from_environment
from server.admin.auth import TokenBook, TokenError
from server.settings import Settings
from server.workers import Supervisor, available_cpus, journal_plans, worker_settings

log = logging.getLogger("server")


async def serve(settings: Settings, adopted: Sequence[Path] = ()) -> None:
    # Imported here: the supervisor forks its workers before any gRPC object exists.
    from server.app import DecisionApp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with DecisionApp(settings, adopted_journals=adopted):
        # What start-up allocated lives as long as the process: kept out of the cyclic
        # collector's full passes, which otherwise walk it while decisions wait.
        gc.freeze()
        await stop.wait()
        log.info("signal received: shutting down")


def run_worker(settings: Settings, adopted: tuple[Path, ...] = ()) -> None:
    uvloop.run(serve(settings, adopted))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decision-server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the ports (default: DECISION_SERVER__WORKERS, "
        "else one per core)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting as the DECISION_* variable that sets it (secrets masked) "
        "and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_from_environment(Settings, "decision-server")
    if args.print_config:
        sys.stdout.write("\n".join(environment_lines(settings)) + "\n")
        return 0
    try:  # here, once: not a traceback from every worker as each starts
        TokenBook.load(settings.admin.tokens.get_secret_value())
    except TokenError as exc:  # its message never holds the token
        sys.stderr.write(f"decision-server: invalid settings:\n  {exc}\n")
        return 2
    configure_logging(settings.telemetry.log_level, settings.telemetry.log_format)
    workers = args.workers or settings.server.workers or available_cpus()
    if workers < 1:
        log.error("--workers must be at least 1")
        return 2
    if workers == 1:
        plan = journal_plans(Path(settings.audit.journal_dir), 1)[0]
        run_worker(worker_settings(settings, 0, 1, plan), plan.adopted)
        return 0
    if settings.server.port == 0 or settings.admin.port == 0:
        log.error("several workers share fixed ports: set DECISION_SERVER__PORT and the admin port")
        return 2
    last_metrics_port = settings.server.metrics_port + workers - 1
    if settings.server.metrics_port and last_metrics_port > 65535:
        log.error(
            "worker %d's metrics port would be %d: DECISION_SERVER__METRICS_PORT is the "
            "first of %d consecutive ports",
            workers - 1,
            last_metrics_port,
            workers,
        )
        return 2
    log.info("starting %d workers on port %d", workers, settings.server.port)
    return Supervisor(settings, workers, run_worker).run()


if __name__ == "__main__":
    sys.exit(main())
