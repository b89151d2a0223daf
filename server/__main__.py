"""``python -m server`` / ``decision-server``: run the decision server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
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
        # What start-up allocated lives as long as the process: kept out of the cyclic
        # collector's full passes, which otherwise walk it while decisions wait.
        gc.freeze()
        await stop.wait()
        log.info("signal received: shutting down")


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
