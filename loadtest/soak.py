"""``make soak DURATION=3600``: the whole local stack (``localstack.LocalStack``, as
``make run``) under open-loop Decide load, judged every 10 s.

Every window prints the answers by source, p50/p99 from the send, late answers, feature
age, the consumer's lag, TorchServe workers lost, the machine's busy and steal shares and
each process group's CPU and RSS (``soak_probe``), judged by ``soak_report.Bounds``.
``--fault`` pauses, kills, slows, stops or empties a part on schedule, ``--chaos`` draws
them (the model answers again within 10 s). At the end every answered decision must be
in the audit store and 99.99 % of calls answered OK in time. Writes every window as
JSON; exits 1 when a bound broke, 2 when the stack did not start. docs/load-tests.md has
the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from core.chaos import REPLICAS
from core.metrics_http import scrape
from core.processes import ProcessStartError
from decision_client.channel import CALLER_OPTIONS
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from loadtest.loadgen import Recorder, open_loop
from loadtest.report import checkout_commit, generated_names, replace_generated
from loadtest.soak_probe import ProcessSampler, machine_usage, stored_decision_ids
from loadtest.soak_report import (
    HEADER,
    Answer,
    Bounds,
    Window,
    availability,
    growth,
    judge,
    machine_drift,
    process_table,
    recovery_s,
    row,
    summarize,
    windows_table,
    write_json,
)
from localstack.faults import FAULT_GROUPS, Fault, chaos_plan, inject
from localstack.levers import HeldLever
from localstack.stack import DEFAULT_SYMBOLS, REPO, LocalStack
from torchserve.replica import replica_dir, workers_lost

# The broker's and the consumer's CPU and memory: the last this many seconds against the
# first, in runs of at least three times as long.
GROWTH_PART_S = 600.0
# After a fault, how long the answers are kept to find when the model answered again.
RECOVERY_WATCH_S = 60.0
LAG_METRIC = "feature_cache_consumer_lag"  # events behind, per partition the consumer owns


class LoadDriver:
    """Open-loop Decide calls at ``rate_per_s`` on ``loadgen``'s schedule (it does not
    wait for answers), every answer kept; ``take()`` hands over the answers completed
    since the last take."""

    def __init__(self, address: str, rate_per_s: float, deadline_ms: float) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=CALLER_OPTIONS)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
        self._rate_per_s = rate_per_s
        self._deadline_ms = deadline_ms
        self._orders = [
            (symbol, side)
            for symbol in DEFAULT_SYMBOLS
            for side in (decision_pb2.SIDE_BUY, decision_pb2.SIDE_SELL)
        ]
        self._answers: list[Answer] = []
        self._recorder = Recorder()  # loadgen's: the send lag
        # Request ids unique across runs: the run folder's audit store outlives a run.
        self.request_prefix = f"soak-{uuid.uuid4().hex[:8]}-"
        self._sent = 0
        self.started_at = time.monotonic()

    async def run(self, until_s: float) -> None:
        """Sends for ``until_s`` seconds, then waits for the answers."""
        sends, rate = round(until_s * self._rate_per_s), self._rate_per_s
        await open_loop(
            self._one, self._recorder, rate_per_s=rate, seconds=until_s, max_requests=sends
        )

    async def _one(self) -> str:
        symbol, side = self._orders[self._sent % len(self._orders)]
        # Each call's own request id: a late call is found in the audit store by it.
        request = decision_pb2.DecideRequest(
            symbol=symbol, side=side, quantity=1.0, request_id=f"{self.request_prefix}{self._sent}"
        )
        self._sent += 1
        sent, sent_unix = time.monotonic(), time.time()
        error: grpc.aio.AioRpcError | None = None
        try:
            response = await self._stub.Decide(request, timeout=self._deadline_ms / 1000)
        except grpc.aio.AioRpcError as exc:
            outcome, age, decision_id = exc.code().name, -1.0, ""
            late = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            error = exc
        else:
            outcome = decision_pb2.Source.Name(response.source).removeprefix("SOURCE_")
            age, decision_id, late = response.feature_age_ms, response.decision_id, False
        done = time.monotonic()
        # Late is gRPC's verdict (DEADLINE_EXCEEDED): an OK answer that this process
        # resumes after the deadline arrived in time and was held by our own event loop.
        # Latency from the send: the soak's bounds are the caller's.
        at_s, ms = done - self.started_at, (done - sent) * 1000
        answer = Answer(at_s, ms, outcome, age, late, decision_id, sent_unix, request.request_id)
        self._answers.append(answer)
        if error is not None:
            raise error
        return outcome

    def take(self) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers

    def take_send_lag_ms(self) -> float:
        """The longest this process's loop sent a call behind its schedule since the
        last take: a stall of the load generator, not of the stack."""
        lag_s, self._recorder.send_lag_max_s = self._recorder.send_lag_max_s, 0.0
        return lag_s * 1000

    async def close(self) -> None:
        await self._channel.close()


def read_lag(port: int) -> int:
    """The feature-cache consumer's lag, from its own /metrics; -1 when it did not answer."""
    try:
        samples = scrape(port)
    except OSError:
        return -1
    return round(sum(v for (name, _), v in samples.items() if name == LAG_METRIC))


def describe_late(answer: Answer) -> str:
    """A late call as the audit store and the server's log can find it: its request id
    and send time."""
    sent = datetime.fromtimestamp(answer.sent_unix_s, UTC).strftime("%H:%M:%S.%f")
    return (
        f"{answer.request_id} sent {sent[:-3]} UTC, {answer.outcome}"
        f" after {answer.latency_ms:.1f} ms"
    )


def fault_at(faults: list[Fault], start_s: float, end_s: float, settle_s: float) -> str:
    for fault in faults:
        if start_s < fault.at_s + fault.duration_s + settle_s and end_s > fault.at_s:
            return fault.label()
    return ""


async def soak(args: argparse.Namespace) -> int:
    bounds = Bounds()
    if args.chaos:
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
        drawn = chaos_plan(
            seed, args.duration_s, spare_s=2 * bounds.recovery_s, workers=args.workers
        )
        args.fault = [*args.fault, *drawn]
        print(f"chaos: seed {seed} (--seed {seed} repeats it), {len(drawn)} faults:")
        print("  " + " ".join(f"--fault {f.spec()}" for f in drawn))
    stack = LocalStack(
        args.run_dir, args.port_offset, args.models,
        workers=args.workers, model_server=args.model_server,
    )  # fmt: skip
    refused = stack.claim_ports()
    if refused:
        print(f"{refused}; is another stack running? (--port-offset N moves this one)")
        return 2
    windows: list[Window] = []
    answered: set[str] = set()
    late_calls: list[str] = []
    try:
        # The probe's and the driver's clients close before the stack stops, however the
        # run ends (an interrupted run too).
        async with contextlib.AsyncExitStack() as clients:
            try:
                await stack.start()
            except ProcessStartError as exc:
                print(f"the stack did not start: {exc}")
                return 2
            # What this process allocated so far (the stack's start imported torch) is kept
            # out of the collector's full passes, which would stall the sender for tens of ms.
            gc.freeze()
            sampler = ProcessSampler(stack.processes, own_name="soak-client")
            lever = HeldLever.of(stack)
            lever.engage(hold_s=args.warmup_s + args.duration_s + 600)
            clients.callback(lever.release)
            driver = LoadDriver(f"127.0.0.1:{stack.decision_port}", args.rate, args.deadline_ms)
            clients.push_async_callback(driver.close)
            replica_dirs = [replica_dir(args.run_dir, name) for name in REPLICAS]
            lost_before = sum(map(workers_lost, replica_dirs))
            print(
                f"load: {args.rate:.0f} Decide/s open loop, {args.deadline_ms:.0f} ms deadline,"
                f" {args.warmup_s:.0f} s warm-up then {args.duration_s:.0f} s measured"
            )
            load = asyncio.create_task(driver.run(args.warmup_s + args.duration_s))
            await asyncio.sleep(args.warmup_s)
            driver.take()  # the warm-up is not judged
            driver.take_send_lag_ms()
            started_at = time.monotonic()
            driver.started_at = started_at
            sampler.sample(started_at)
            machine_usage()  # from now on
            scheduled = [asyncio.create_task(inject(stack, f, started_at)) for f in args.fault]
            after_faults: dict[Fault, list[Answer]] = {fault: [] for fault in args.fault}
            print(HEADER)
            window_start, early = 0.0, list[Answer]()
            while window_start < args.duration_s - 0.5:
                window_end = min(window_start + args.window_s, args.duration_s)
                await asyncio.sleep(max(0.0, started_at + window_end - time.monotonic()))
                last = window_end >= args.duration_s
                if last:
                    await load  # the last answers come within one deadline
                # A window holds the answers that came within it: the loop wakes a little
                # after its end, and what came since belongs to the next (a fault's first).
                answers = early + driver.take()
                early = [a for a in answers if a.done_at_s >= window_end and not last]
                answers = [a for a in answers if a.done_at_s < window_end or last]
                answered.update(a.decision_id for a in answers if a.decision_id)
                for fault, after in after_faults.items():
                    end_s = fault.at_s + fault.duration_s
                    after += [a for a in answers if end_s <= a.done_at_s < end_s + RECOVERY_WATCH_S]
                # Read off the loop's thread: a pass over /proc and the replicas' logs takes
                # tens of ms, and the sender would fall behind its schedule meanwhile.
                processes = await asyncio.to_thread(sampler.sample, time.monotonic())
                lost = await asyncio.to_thread(sum, map(workers_lost, replica_dirs))
                consumer_lag = await asyncio.to_thread(read_lag, stack.consumer_metrics_port)
                window = summarize(
                    answers,
                    window_start,
                    window_end,
                    consumer_lag=consumer_lag,
                    workers_lost=lost - lost_before,
                    processes=processes,
                    machine=machine_usage(),
                    client_send_lag_max_ms=driver.take_send_lag_ms(),
                    fault=fault_at(args.fault, window_start, window_end, bounds.recovery_s),
                )
                window.broken = judge(window, bounds) + await lever.broken()
                windows.append(window)
                print(row(window), flush=True)
                for answer in answers:
                    if answer.late:
                        late_calls.append(describe_late(answer))
                        print(f"{'':>11} late: {late_calls[-1]}", flush=True)
                window_start = window_end
            not_done = [problem for problem in await asyncio.gather(*scheduled) if problem]
            missing = await _missing_from_audit(stack, answered)
    finally:
        await stack.stop()
    recoveries = {
        fault: recovery_s(after, fault.at_s + fault.duration_s)
        for fault, after in after_faults.items()
    }
    return report(args, windows, bounds, missing, len(answered), recoveries, late_calls, not_done)


async def _missing_from_audit(stack: LocalStack, answered: set[str]) -> int:
    """Decisions answered but not in the audit store, after giving the shipper 30 s."""
    database = stack.run_dir / "audit" / "audit.db"
    deadline = time.monotonic() + 30
    while True:
        missing = len(answered - await asyncio.to_thread(stored_decision_ids, database))
        if missing == 0 or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(1)


def report(
    args: argparse.Namespace,
    windows: list[Window],
    bounds: Bounds,
    missing: int,
    answered: int,
    recoveries: dict[Fault, float | None],
    late_calls: list[str],
    not_done: list[str],
) -> int:
    """``not_done``: the faults that could not be applied, in words."""
    broken = [f"{w.start_s:.0f}-{w.end_s:.0f} s: {b}" for w in windows for b in w.broken]
    broken += not_done
    # Growth is a trend over the first and last GROWTH_PART_S; a shorter run's parts are
    # minutes apart and measure the machine's moods instead.
    drift = None
    if args.duration_s >= 3 * GROWTH_PART_S:
        stops = sorted((f.at_s + f.duration_s, f.target) for f in args.fault if f.action == "stop")
        broken += growth(windows, bounds, GROWTH_PART_S, {FAULT_GROUPS[t][0]: s for s, t in stops})
        drift = machine_drift(windows, GROWTH_PART_S)
    for fault, took_s in recoveries.items():
        if took_s is None or took_s > bounds.recovery_s:
            after = "never" if took_s is None else f"after {took_s:.0f} s"
            broken.append(
                f"{fault.label()} at {fault.at_s:.0f} s: the model answered ≥ 99 % again {after}"
            )
    if missing:
        broken.append(f"{missing} of {answered} answered decisions missing from the audit store")
    in_time, calls = availability(windows)
    if calls and in_time < bounds.min_availability * calls:
        broken.append(
            f"availability {in_time / calls:.4%} < {bounds.min_availability:.2%}"
            f" ({calls - in_time} of {calls:,} calls not answered OK in time)"
        )
    steady = [w for w in windows if not w.fault]
    summary = {
        "rate_per_s": args.rate,
        "deadline_ms": args.deadline_ms,
        "duration_s": args.duration_s,
        "faults": [asdict(f) | {"recovery_s": recoveries.get(f)} for f in args.fault],
        "bounds": asdict(bounds),
        "answered": answered,
        "missing_from_audit": missing,
        "calls": calls,
        "answered_in_time": in_time,
        "late": sum(w.late for w in windows),
        "late_calls": late_calls,
        "workers_lost": windows[-1].workers_lost if windows else 0,
        "min_model_share": min((w.model_share for w in steady), default=0.0),
        "max_p99_ms": max((w.p99_ms for w in steady), default=0.0),
        # The replayer's CPU (fixed work) last 10 minutes against the first: the machine.
        "machine_drift": drift,
        "broken": broken,
    }
    write_json(args.json, summary, windows)
    verdict = "soak: PASSED" if not broken else f"soak: FAILED ({len(broken)} bounds broken)"
    outcome = [
        f"{answered:,} decisions; availability {in_time / max(calls, 1):.4%} of {calls:,}"
        f" calls; {summary['late']} answers after the deadline in all"
        f" {len(windows)} windows, faults included; TorchServe workers lost"
        f" {summary['workers_lost']}; steady windows: model share ≥"
        f" {summary['min_model_share']:.1%}, p99 ≤ {summary['max_p99_ms']:.1f} ms; missing"
        f" from the audit store {missing}; {verdict}.",
        *(
            f"{fault.label()} at {fault.at_s:.0f} s: the model answered again"
            + (" not within the run" if took is None else f" {took:.0f} s after")
            for fault, took in recoveries.items()
        ),
    ]
    print("", *outcome, sep="\n")
    for line in broken:
        print(f"BROKEN {line}")
    print(f"{verdict} (every window in {args.json})")
    if windows:
        write_docs(args, windows, outcome)
    return 1 if broken else 0


def write_docs(args: argparse.Namespace, windows: list[Window], outcome: list[str]) -> None:
    """The run's tables into each ``--doc`` page's soak blocks (``soak-processes``: each
    process's CPU and RSS; ``soak-windows``: the steady windows per 10 minutes)."""
    began = time.gmtime(time.time() - args.duration_s)
    faults = " ".join(f"{f.target}@{f.at_s:g}" + (f"+{f.duration_s:g}" if f.duration_s else "")
                      for f in args.fault)  # fmt: skip
    caption = (
        f"{time.strftime('%Y-%m-%d %H:%M', began)} to {time.strftime('%H:%M', time.gmtime())}"
        f" UTC, commit {checkout_commit()}, {args.duration_s / 60:.0f} minutes at"
        f" {args.rate:.0f} Decide/s" + (f", faults {faults}" if faults else "")
    )
    blocks = {
        "soak-processes": process_table(windows, GROWTH_PART_S, caption),
        "soak-windows": f"{caption}; steady windows (outside a fault and the 10 s after it)"
        f" per 10 minutes:\n\n{windows_table(windows, 600.0)}\n\n"
        + "\n".join(f"- {line}" for line in outcome),
    }
    for page in args.doc:
        names = [name for name in generated_names(page) if name in blocks]
        for name in names:
            replace_generated(page, name, blocks[name])
        print(f"{page}: {', '.join(names) or f'no generated block of {list(blocks)}'} written")


OPTIONS: dict[str, dict[str, Any]] = {
    "--duration-s": {"type": float, "default": 600.0, "help": "measured seconds"},
    "--warmup-s": {"type": float, "default": 10.0, "help": "load before measuring"},
    "--rate": {"type": float, "default": 100.0, "help": "Decide calls a second"},
    "--deadline-ms": {"type": float, "default": 50.0},
    "--window-s": {"type": float, "default": 10.0},
    "--fault": {"type": Fault.parse, "action": "append", "default": [],
                "help": "[ACTION:]TARGET@START+DURATION: pause (the default: primary,"
                " replicas, redis, broker), kill or slow (primary, secondary, challenger),"
                " stop (broker); or redis-empty@START, kill-worker@START"},
    "--chaos": {"action": "store_true",
                "help": "a fault drawn from the whole set every 2-4 minutes (--seed)"},
    "--seed": {"type": int, "help": "the chaos plan's seed (default: drawn, printed)"},
    "--workers": {"type": int, "default": 1, "help": "decision-server worker processes"},
    "--model-server": {"choices": ("torchserve", "triton"), "default": "torchserve"},
    "--run-dir": {"type": Path, "default": REPO / ".run/soak"},
    "--port-offset": {"type": int, "default": 0},
    "--models": {"type": Path, "help": "archives to serve (default: .run/models)"},
    "--json": {"type": Path, "default": REPO / ".run/soak/soak.json"},
    "--doc": {"type": Path, "action": "append", "default": [],
              "help": "write the run's tables into this page's generated soak-processes and"
              " soak-windows blocks (docs/local-stack.md, docs/load-tests.md); repeatable"},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, options in OPTIONS.items():
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends a soak as Ctrl-C does: the stack it started is stopped on the way out
    # (the default action would end this process alone and leave every part running).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(soak(args)))
    raise SystemExit(130)


if __name__ == "__main__":
    main()
