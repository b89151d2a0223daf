"""Trial calls for a breaker that no request tries.

An open breaker closes through trial calls, and those come from requests: a replica no
request reaches (the secondary, once the primary answers again) would stay open, in
status, metrics and alerts, long after it recovered. Every ``PROBE_INTERVAL_S``, each
replica whose breaker would let a trial call through gets probe calls, a row of zeros
each, until its breaker closes or a call fails. A replica on-call forced open or closed
is left alone, and a probe call is a call like any other (``server.replica``). Where it
fits: docs/architecture.md#deadlines-and-load-on-the-decide-path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from core.tasks import cancel_and_wait
from feature_cache.schema import FEATURE_NAMES, model_row
from server.breaker import CLOSED, SUCCESSES_TO_CLOSE
from server.control.state import ControlState
from server.model_errors import ModelInputError
from server.replica import Replica

log = logging.getLogger(__name__)

# How often replicas whose breakers no request tries are probed: a recovered secondary
# shows closed within about a second.
PROBE_INTERVAL_S = 0.5
# A row any replica of the model takes: a buy with every feature 0.
PROBE_ROW = model_row(1.0, [0.0] * len(FEATURE_NAMES))


class BreakerProbe:
    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        call_timeout_ms: float,
        control: Callable[[], ControlState],
        calls_to_close: int = SUCCESSES_TO_CLOSE,
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        """``calls_to_close``: the most probe calls one pass makes to one replica (the
        breaker's success threshold: enough to close it)."""
        self._replicas = list(replicas)
        self._interval_s = interval_s
        self._timeout_ms = call_timeout_ms
        self._control = control
        self._calls_to_close = calls_to_close
        self._task: asyncio.Task[None] | None = None
        self.calls = 0  # probe calls made

    async def start(self) -> None:
        if self._task is None and self._interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="breaker-probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            for replica in list(self._replicas):
                try:
                    await self.probe(replica)
                except ModelInputError as exc:  # a model that takes other rows
                    log.warning(
                        "breaker probe: %s rejected the probe row, not probed: %s",
                        replica.name,
                        exc,
                    )
                    self._replicas.remove(replica)
                except Exception:  # a bug must not end probing for good: logged, next pass
                    log.exception("breaker probe of %s failed", replica.name)

    async def probe(self, replica: Replica) -> None:
        """Probe calls to ``replica`` while its breaker is not closed and lets one
        through, at most ``calls_to_close``; stops at the first that fails."""
        for _ in range(self._calls_to_close):
            if replica.breaker.state == CLOSED:
                return
            admission = replica.admission(self._control(), time.time_ns() // 1000)
            # Not guarded: on-call forced it open or closed, and the override decides.
            if not admission.allowed or not admission.guarded:
                return
            attempt = await replica.call([PROBE_ROW], self._timeout_ms, admission)
            self.calls += 1
            if not attempt.ok:
                return
