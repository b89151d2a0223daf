"""``python -m server`` / ``decision-server``: run the decision server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvloop

from server.app import DecisionApp
from server.settings import Settings

log = logging.getLogger("server")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with DecisionApp(settings):
        await stop.wait()
        log.info("signal received: shutting down")


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("DECISION_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvloop.run(serve(Settings()))


if __name__ == "__main__":
    main()
