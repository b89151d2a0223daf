"""``python -m localkafka``: runs the broker in the foreground until SIGTERM or SIGINT, then
stops accepting, fsyncs and exits 0 (1 if it could not start)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop

from localkafka.errors import LocalKafkaError
from localkafka.server import Broker
from localkafka.settings import BrokerSettings, parse_args

log = logging.getLogger("localkafka")


async def serve(settings: BrokerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Broker(settings):
        await stop.wait()
        log.info("signal received, stopping")


def main(argv: Sequence[str] | None = None) -> int:
    settings, level = parse_args(argv)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        uvloop.run(serve(settings))
    except (LocalKafkaError, OSError) as exc:
        log.error("broker failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
