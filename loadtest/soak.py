"""``make soak DURATION=3600``: the whole local stack under steady Decide load, judged
every 10 s.

Starts the stack as ``make run`` does (``localstack.LocalStack``: redis-server,
the broker, three TorchServe replicas, the feature-cache consumer, the replayer at 300
events/s, the decision server), then drives Decide open loop (default 100/s over the
default symbols, both sides, a 50 ms deadline) from this process and every window
prints: answers by source, p50/p99 from the send, answers after the deadline, feature
age p99, the consumer group's lag, TorchServe workers lost, the machine's busy and
steal share (a shared VM's host can take the CPU from every process at once), and each
process group's CPU and RSS. Faults (``--fault primary@120+30``: SIGSTOP the primary 120 s into
the load, SIGCONT 30 s later; targets primary, replicas, redis, broker) are injected
on schedule; after each, the model must answer ≥ 99 % of a second's calls again within
10 s. At the end every OK answer's decision must be in the audit store (each late call
is printed as the server recorded it, found by its own request id), and in runs of
30 minutes or more the broker's and the consumer's CPU and RSS over the last 10 minutes
must be within 25 % of the first 10.

Writes a JSON summary and a PNG timeline, and exits 1 when a bound was broken (see
``loadtest.soak_report``), 2 when the stack did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from core.processes import ProcessStartError
from feature_cache.settings import FeatureCacheSettings
from loadtest.soak_probe import (
    ConsumerLag,
    MachineSampler,
    ProcessSampler,
    ServerView,
    Stall,
    StallWitness,
    server_views,
    stored_decision_ids,
)
from loadtest.soak_report import (
    HEADER,
    MODEL_SOURCES,
    Answer,
    Bounds,
    Window,
    draw_timeline,
    growth,
    judge,
    machine_drift,
    recovery_s,
    row,
    summarize,
    write_json,
)
from localstack.__main__ import DEFAULT_SYMBOLS, REPO, LocalStack
from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from torchserve.replica import replica_dir, workers_lost

REPLICAS = ("primary", "secondary", "challenger")
# The broker's and the consumer's CPU and memory: the last this many seconds against the
# first, in runs of at least three times as long.
GROWTH_PART_S = 600.0
# After a fault, how long the answers are kept to find when the model answered again.
RECOVERY_WATCH_S = 60.0
FAULT_GROUPS = {
    "primary": ("torchserve-primary",),
    "replicas": ("torchserve-primary", "torchserve-secondary"),
    "redis": ("redis-server",),
    "broker": ("kafka-broker",),
}


@dataclass(frozen=True, slots=True)
class Fault:
    target: str
    at_s: float
    duration_s: float

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``TARGET@START+DURATION``, seconds since the measured load started."""
        try:
            target, when = text.split("@")
            start, duration = when.split("+")
            fault = cls(target, float(start), float(duration))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not TARGET@START+DURATION: {text!r}") from None
        if target not in FAULT_GROUPS:
            raise argparse.ArgumentTypeError(f"fault target one of {', '.join(FAULT_GROUPS)}")
        return fault

    def label(self) -> str:
        return f"{self.target} paused"


class LoadDriver:
    """Open-loop Decide calls at ``rate_per_s`` (a fixed schedule that does not wait for
    answers); ``take()`` hands over the answers completed since the last take."""

    def __init__(self, address: str, rate_per_s: float, deadline_ms: float) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
        self._interval_s = 1.0 / rate_per_s
        self._deadline_ms = deadline_ms
        self._orders = [
            (symbol, side)
            for symbol in DEFAULT_SYMBOLS
            for side in (decision_pb2.SIDE_BUY, decision_pb2.SIDE_SELL)
        ]
        self._answers: list[Answer] = []
        # Request ids unique across runs: the run folder's audit store outlives a run.
        self._run_token = uuid.uuid4().hex[:8]
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_lag_max_s = 0.0
        self.started_at = time.monotonic()

    async def run(self, until_s: float) -> None:
        """Sends until ``until_s`` seconds after ``started_at``, then waits for the answers."""
        loop = asyncio.get_running_loop()
        begin = loop.time()
        sent = 0
        while (next_at := begin + sent * self._interval_s) < begin + until_s:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self._send_lag_max_s = max(self._send_lag_max_s, loop.time() - next_at)
            symbol, side = self._orders[sent % len(self._orders)]
            # Each call's own request id: a late call is found in the audit store by it.
            request = decision_pb2.DecideRequest(
                symbol=symbol, side=side, quantity=1.0, request_id=f"soak-{self._run_token}-{sent}"
            )
            task = asyncio.create_task(self._one(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            sent += 1
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _one(self, request: decision_pb2.DecideRequest) -> None:
        sent, sent_unix = time.monotonic(), time.time()
        try:
            response = await self._stub.Decide(request, timeout=self._deadline_ms / 1000)
        except grpc.aio.AioRpcError as exc:
            outcome, age, decision_id = exc.code().name, -1.0, ""
            late = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            outcome = decision_pb2.Source.Name(response.source).removeprefix("SOURCE_")
            age, decision_id, late = response.feature_age_ms, response.decision_id, False
        done = time.monotonic()
        latency_ms = (done - sent) * 1000
        # Late is gRPC's verdict (DEADLINE_EXCEEDED): an OK answer that this process
        # resumes after the deadline arrived in time and was held by our own event loop.
        self._answers.append(
            Answer(
                done - self.started_at,
                latency_ms,
                outcome,
                age,
                late,
                decision_id,
                sent_unix,
                request.request_id,
            )
        )

    def take(self) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers

    def take_send_lag_ms(self) -> float:
        """The longest this process's loop sent a call behind its schedule since the
        last take: a stall of the load generator, not of the stack."""
        lag_s, self._send_lag_max_s = self._send_lag_max_s, 0.0
        return lag_s * 1000

    async def close(self) -> None:
        await self._channel.close()


async def inject(stack: LocalStack, fault: Fault, started_at: float) -> None:
    await asyncio.sleep(max(0.0, started_at + fault.at_s - time.monotonic()))
    groups = [stack.processes[name] for name in FAULT_GROUPS[fault.target]]
    print(f"--- fault: SIGSTOP {', '.join(p.name for p in groups)} for {fault.duration_s:.0f} s")
    for proc in groups:
        proc.pause()
    try:
        await asyncio.sleep(fault.duration_s)
    finally:
        for proc in groups:
            proc.resume()
        print(f"--- fault over: SIGCONT {', '.join(p.name for p in groups)}")


def count_workers_lost(replica_dirs: list[Path]) -> int:
    return sum(workers_lost(d) for d in replica_dirs)


def describe_late(answer: Answer, stalls: list[Stall]) -> str:
    """A late call's send time (to find it in the server's log and the audit store) and
    the machine stalls the witness saw while it was out."""
    sent = _clock(answer.sent_unix_s)
    ended = answer.sent_unix_s + answer.latency_ms / 1000
    near = [
        f"{s.late_ms:.0f} ms ending {(s.at_unix_s - answer.sent_unix_s) * 1000:+.0f} ms"
        for s in stalls
        if answer.sent_unix_s - 0.2 <= s.at_unix_s <= ended + 0.2
    ]
    witness = f"machine stalls {', '.join(near)}" if near else "no machine stall"
    return f"sent {sent} UTC, {answer.outcome} after {answer.latency_ms:.1f} ms; {witness}"


def _clock(unix_s: float) -> str:
    """A wall-clock time of day, UTC, to the millisecond."""
    return datetime.fromtimestamp(unix_s, UTC).strftime("%H:%M:%S.%f")[:-3]


def describe_server_view(answer: Answer, view: ServerView | None) -> str:
    """Where a late call's time went, as the server's audit row tells: a decision made
    in time whose answer still came late was held after it (the server's loop or the
    client's), one made late overran the server's budget, and none at all never reached
    the decision engine (queued in gRPC, or shed as expired)."""
    if view is None:
        return "the server never decided it"
    began_ms = (view.received_unix_s - answer.sent_unix_s) * 1000
    decided_ms = (view.decided_unix_s - answer.sent_unix_s) * 1000
    return (
        f"the server began {began_ms:+.1f} ms after the send and decided"
        f" {decided_ms:+.1f} ms ({view.source}: {view.reason})"
    )


def fault_at(faults: list[Fault], start_s: float, end_s: float, settle_s: float) -> str:
    for fault in faults:
        if start_s < fault.at_s + fault.duration_s + settle_s and end_s > fault.at_s:
            return fault.label()
    return ""


async def soak(args: argparse.Namespace) -> int:
    bounds = Bounds()
    stack = LocalStack(args.run_dir, args.port_offset, args.models)
    refused = stack.claim_ports()
    if refused:
        print(f"{refused}; is another stack running? (--port-offset N moves this one)")
        return 2
    kafka = FeatureCacheSettings().kafka
    windows: list[Window] = []
    answered: set[str] = set()
    late_answers: list[Answer] = []
    late_calls: list[str] = []  # each as the server recorded it
    witness = StallWitness(args.run_dir, REPO)
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
            lag = ConsumerLag(f"127.0.0.1:{stack.kafka_port}", kafka.topic, kafka.group_id)
            await lag.start()
            clients.push_async_callback(lag.stop)
            driver = LoadDriver(f"127.0.0.1:{stack.decision_port}", args.rate, args.deadline_ms)
            clients.push_async_callback(driver.close)
            replica_dirs = [replica_dir(args.run_dir, name) for name in REPLICAS]
            lost_before = count_workers_lost(replica_dirs)
            print(
                f"load: {args.rate:.0f} Decide/s open loop, {args.deadline_ms:.0f} ms deadline,"
                f" {args.warmup_s:.0f} s warm-up then {args.duration_s:.0f} s measured"
            )
            load = asyncio.create_task(driver.run(args.warmup_s + args.duration_s))
            await asyncio.sleep(args.warmup_s)
            driver.take()  # the warm-up is not judged
            driver.take_send_lag_ms()
            witness.start()
            started_at = time.monotonic()
            driver.started_at = started_at
            sampler.sample(started_at)
            machine = MachineSampler()
            injections = [asyncio.create_task(inject(stack, f, started_at)) for f in args.fault]
            after_faults: dict[Fault, list[Answer]] = {fault: [] for fault in args.fault}
            print(HEADER)
            window_start = 0.0
            while window_start < args.duration_s - 0.5:
                window_end = min(window_start + args.window_s, args.duration_s)
                await asyncio.sleep(max(0.0, started_at + window_end - time.monotonic()))
                if window_end >= args.duration_s:
                    await load  # the last answers come within one deadline
                answers = driver.take()
                stalls = witness.take()
                answered.update(a.decision_id for a in answers if a.decision_id)
                for fault, after in after_faults.items():
                    end_s = fault.at_s + fault.duration_s
                    after += [a for a in answers if end_s <= a.done_at_s < end_s + RECOVERY_WATCH_S]
                # Read off the loop's thread: a pass over /proc and the replicas' logs takes
                # tens of ms, and the sender would fall behind its schedule meanwhile.
                processes = await asyncio.to_thread(sampler.sample, time.monotonic())
                lost = await asyncio.to_thread(count_workers_lost, replica_dirs)
                try:
                    consumer_lag = await lag.read()
                except Exception:  # noqa: BLE001 - a paused broker: no figure this window
                    consumer_lag = -1
                window = summarize(
                    answers,
                    window_start,
                    window_end,
                    consumer_lag=consumer_lag,
                    workers_lost=lost - lost_before,
                    processes=processes,
                    machine=astuple(machine.sample()),
                    machine_stall_max_ms=max((s.late_ms for s in stalls), default=0.0),
                    client_send_lag_max_ms=driver.take_send_lag_ms(),
                    fault=fault_at(args.fault, window_start, window_end, bounds.recovery_s),
                )
                window.broken = judge(window, bounds)
                windows.append(window)
                print(row(window), flush=True)
                for answer in answers:
                    if answer.late:
                        late_answers.append(answer)
                        print(f"{'':>11} late: {describe_late(answer, stalls)}", flush=True)
                window_start = window_end
            await asyncio.gather(*injections)
            missing = await _missing_from_audit(stack, answered)
            views = await asyncio.to_thread(
                server_views,
                stack.run_dir / "audit" / "audit.db",
                [a.request_id for a in late_answers],
            )
            late_calls = [
                f"sent {_clock(a.sent_unix_s)}: {describe_server_view(a, views.get(a.request_id))}"
                for a in late_answers
            ]
            if late_calls:
                print("\nlate calls as the server recorded them:")
                print("\n".join(f"  {line}" for line in late_calls))
    finally:
        witness.stop()
        await stack.stop()
    recoveries = {
        fault: recovery_s(after, fault.at_s + fault.duration_s)
        for fault, after in after_faults.items()
    }
    return report(args, windows, bounds, missing, len(answered), recoveries, late_calls)


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
) -> int:
    broken = [f"{w.start_s:.0f}-{w.end_s:.0f} s: {b}" for w in windows for b in w.broken]
    # Growth is a trend over the first and last GROWTH_PART_S; a shorter run's parts are
    # minutes apart and measure the machine's moods instead.
    drift = None
    if args.duration_s >= 3 * GROWTH_PART_S:
        broken += growth(windows, bounds, GROWTH_PART_S)
        drift = machine_drift(windows, GROWTH_PART_S)
    for fault, took_s in recoveries.items():
        if took_s is None or took_s > bounds.recovery_s:
            after = "never" if took_s is None else f"after {took_s:.0f} s"
            broken.append(
                f"{fault.label()} at {fault.at_s:.0f} s: the model answered ≥ 99 % again {after}"
            )
    if missing:
        broken.append(f"{missing} of {answered} answered decisions missing from the audit store")
    steady = [w for w in windows if not w.fault]
    summary = {
        "rate_per_s": args.rate,
        "deadline_ms": args.deadline_ms,
        "duration_s": args.duration_s,
        "faults": [asdict(f) | {"recovery_s": recoveries.get(f)} for f in args.fault],
        "bounds": asdict(bounds),
        "answered": answered,
        "missing_from_audit": missing,
        "late": sum(w.late for w in windows),
        "late_calls": late_calls,  # each as the server recorded it
        "workers_lost": windows[-1].workers_lost if windows else 0,
        "min_model_share": min((w.model_share for w in steady), default=0.0),
        "max_p99_ms": max((w.p99_ms for w in steady), default=0.0),
        "model_answers": sum(
            n for w in windows for source, n in w.outcomes.items() if source in MODEL_SOURCES
        ),
        # The replayer's CPU (fixed work) last 10 minutes against the first: the machine.
        "machine_drift": drift,
        "broken": broken,
    }
    write_json(args.json, summary, windows)
    if windows:
        draw_timeline(
            args.png,
            windows,
            f"soak: {args.rate:.0f} Decide/s, {args.duration_s / 60:.0f} min"
            + (f", faults: {', '.join(f.target for f in args.fault)}" if args.fault else ""),
        )
    print(
        f"\n{answered} decisions; late {summary['late']}; TorchServe workers lost"
        f" {summary['workers_lost']}; steady windows: model share ≥"
        f" {summary['min_model_share']:.1%}, p99 ≤ {summary['max_p99_ms']:.1f} ms;"
        f" audit missing {missing}. JSON {args.json}, PNG {args.png}"
    )
    if drift is not None:
        print(
            f"the machine's speed, last part against the first: the replayer's fixed work"
            f" took x{drift:.2f} the CPU"
        )
    for fault, took_s in recoveries.items():
        after = "not within the run" if took_s is None else f"{took_s:.0f} s after"
        print(f"{fault.label()} at {fault.at_s:.0f} s: the model answered again {after}")
    for line in broken:
        print(f"BROKEN {line}")
    print("soak: PASSED" if not broken else f"soak: FAILED ({len(broken)} bounds broken)")
    return 1 if broken else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="measured seconds")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before measuring")
    parser.add_argument("--rate", type=float, default=100.0, help="Decide calls a second")
    parser.add_argument("--deadline-ms", type=float, default=50.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--fault", type=Fault.parse, action="append", default=[])
    parser.add_argument("--run-dir", type=Path, default=REPO / ".run/soak")
    parser.add_argument("--port-offset", type=int, default=0)
    parser.add_argument("--models", type=Path, help="archives to serve (default: .run/models)")
    parser.add_argument("--json", type=Path, default=REPO / ".run/soak/soak.json")
    parser.add_argument("--png", type=Path, default=REPO / "docs/img/soak.png")
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
