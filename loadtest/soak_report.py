"""The soak's windows: what one 10 s window saw, the bounds it is judged by, the table,
and the JSON summary.

A window overlapping a fault, or ending less than ``recovery_s`` after one, is a fault
window: answers must still all come before the deadline, but who answered, how fast and
how fresh the features were are not held to the steady-state bounds.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.stats import percentile
from loadtest.report import markdown_table

MODEL_SOURCES = frozenset({"PRIMARY", "SECONDARY", "CANARY"})
# Every source of an answer: a call that ended with one of these was answered OK in time.
ANSWER_SOURCES = MODEL_SOURCES | {"CACHED_SCORE", "RULES", "ABSTAIN"}
# Processes whose CPU and memory must not grow over the run (the broker and the consumer
# decayed before: a fetch cost that grew with the broker's history).
FLAT_PROCESSES = ("kafka-broker", "feature-cache")
# A process whose work is fixed (the replayer publishes 300 events/s whatever else runs):
# its CPU rising means the machine got slower (a busy host, a lower clock), and every
# process's CPU rises with it. CPU growth is judged against it.
YARDSTICK = "replayer"


@dataclass(frozen=True, slots=True)
class Answer:
    """One Decide call as the client saw it."""

    done_at_s: float  # since the load started
    latency_ms: float  # from the send
    outcome: str  # the source (PRIMARY, RULES, ...) or the gRPC status name if not OK
    feature_age_ms: float  # -1: none used, or not OK
    late: bool  # ended DEADLINE_EXCEEDED: no answer within the caller's deadline
    decision_id: str = ""
    sent_unix_s: float = 0.0  # to find the call in the server's log and the audit store
    request_id: str = ""  # the call's own, found in the audit store by it


@dataclass(frozen=True, slots=True)
class Bounds:
    min_model_share: float = 0.99
    max_p99_ms: float = 30.0
    max_feature_age_p99_ms: float = 500.0
    max_workers_lost: int = 0
    max_growth: float = 0.25  # FLAT_PROCESSES, last vs first part of the run
    recovery_s: float = 10.0  # after a fault, time the model gets to answer again
    min_availability: float = 0.9999  # calls answered OK in time, over the run


@dataclass(slots=True)
class Window:
    start_s: float
    end_s: float
    answers: int
    outcomes: dict[str, int]
    model_share: float
    p50_ms: float
    p99_ms: float
    late: int
    feature_age_p99_ms: float
    consumer_lag: int
    workers_lost: int  # cumulative since the soak started
    processes: dict[str, tuple[float, float]]  # name -> (CPU % of a core, RSS MB)
    fault: str = ""  # the fault this window overlaps or recovers from
    broken: list[str] = field(default_factory=list)
    # The whole machine over the window, % of all cores: busy, and stolen by the host.
    machine_busy_pct: float = 0.0
    machine_steal_pct: float = 0.0
    # The longest the load generator's own loop sent behind schedule.
    client_send_lag_max_ms: float = 0.0


def summarize(
    answers: Sequence[Answer],
    start_s: float,
    end_s: float,
    *,
    consumer_lag: int,
    workers_lost: int,
    processes: dict[str, tuple[float, float]],
    fault: str,
    machine: tuple[float, float] = (0.0, 0.0),
    client_send_lag_max_ms: float = 0.0,
) -> Window:
    """``machine``: (busy %, steal %) of all cores over the window."""
    outcomes = Counter(a.outcome for a in answers)
    latencies = [a.latency_ms for a in answers] or [0.0]
    ages = [a.feature_age_ms for a in answers if a.feature_age_ms >= 0] or [0.0]
    model = sum(a.outcome in MODEL_SOURCES for a in answers)
    return Window(
        start_s=start_s,
        end_s=end_s,
        answers=len(answers),
        outcomes=dict(outcomes),
        model_share=model / len(answers) if answers else 0.0,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        late=sum(a.late for a in answers),
        feature_age_p99_ms=percentile(ages, 0.99),
        consumer_lag=consumer_lag,
        workers_lost=workers_lost,
        processes=processes,
        fault=fault,
        machine_busy_pct=machine[0],
        machine_steal_pct=machine[1],
        client_send_lag_max_ms=client_send_lag_max_ms,
    )


def judge(window: Window, bounds: Bounds) -> list[str]:
    """The bounds this window broke, in words."""
    broken = []
    if window.late:
        broken.append(f"{window.late} answers after the deadline")
    if window.workers_lost > bounds.max_workers_lost:
        broken.append(f"{window.workers_lost} TorchServe workers lost")
    if window.answers == 0:
        broken.append("no answers")
    if window.fault:
        return broken
    if window.answers and window.model_share < bounds.min_model_share:
        broken.append(f"model share {window.model_share:.1%} < {bounds.min_model_share:.0%}")
    if window.p99_ms > bounds.max_p99_ms:
        broken.append(f"p99 {window.p99_ms:.1f} ms > {bounds.max_p99_ms:.0f} ms")
    if window.feature_age_p99_ms > bounds.max_feature_age_p99_ms:
        broken.append(
            f"feature age p99 {window.feature_age_p99_ms:.0f} ms"
            f" > {bounds.max_feature_age_p99_ms:.0f} ms"
        )
    return broken


def recovery_s(
    answers: Sequence[Answer], since_s: float, *, slice_s: float = 1.0, min_share: float = 0.99
) -> float | None:
    """Seconds from ``since_s`` (a fault's end) to the start of the first ``slice_s`` in
    which the model gave at least ``min_share`` of the answers; None if none did."""
    slices: dict[int, list[bool]] = {}
    for answer in answers:
        if answer.done_at_s >= since_s:
            index = int((answer.done_at_s - since_s) // slice_s)
            slices.setdefault(index, []).append(answer.outcome in MODEL_SOURCES)
    for index in sorted(slices):
        by_model = slices[index]
        if sum(by_model) >= min_share * len(by_model):
            return index * slice_s
    return None


def first_and_last(windows: Sequence[Window], part_s: float) -> tuple[list[Window], list[Window]]:
    """The steady windows of the run's first and last ``part_s``."""
    steady = [w for w in windows if not w.fault]
    if not steady:
        return [], []
    first = [w for w in steady if w.end_s <= steady[0].start_s + part_s]
    return first, [w for w in steady if w.start_s >= steady[-1].end_s - part_s]


def mean_usage(part: Sequence[Window], name: str, index: int) -> float:
    """A process's mean CPU (``index`` 0) or RSS (1) over the windows that sampled it."""
    values = [w.processes[name][index] for w in part if name in w.processes]
    return sum(values) / len(values) if values else 0.0


def growth(
    windows: Sequence[Window], bounds: Bounds, part_s: float, restarted_s: Mapping[str, float]
) -> list[str]:
    """FLAT_PROCESSES' mean CPU and RSS over the last ``part_s`` against the first
    ``part_s`` of the run; what grew past ``bounds.max_growth``, in words. CPU is
    compared in units of the ``YARDSTICK``'s CPU over the same windows, when it ran. A
    process restarted at ``restarted_s[name]`` (the broker after a stop: it reads its log
    back, and starts larger) is judged from then, when three parts of the run are left."""
    broken = []
    for name in FLAT_PROCESSES:
        since = restarted_s.get(name, 0.0)
        own = [w for w in windows if w.start_s >= since]
        if not own or (since and own[-1].end_s - since < 3 * part_s):
            continue
        first, last = first_and_last(own, part_s)
        machine = machine_drift(own, part_s)
        for index, what, floor in ((0, "CPU", 2.0), (1, "RSS", 5.0)):
            before, after = mean_usage(first, name, index), mean_usage(last, name, index)
            scale = machine if what == "CPU" and machine is not None else None
            # A floor: 1 % -> 1.3 % of a core is noise, not growth.
            if after / (scale or 1.0) > max(before, floor) * (1 + bounds.max_growth):
                against = "" if scale is None else f" (the {YARDSTICK}'s x{scale:.2f})"
                broken.append(f"{name} {what} grew {before:.1f} -> {after:.1f}{against}")
    return broken


def machine_drift(windows: Sequence[Window], part_s: float) -> float | None:
    """The ``YARDSTICK``'s CPU over the last ``part_s`` against the first: how much
    slower the machine ran at the end (None when it did not run)."""
    first, last = first_and_last(windows, part_s)
    before, after = mean_usage(first, YARDSTICK, 0), mean_usage(last, YARDSTICK, 0)
    return after / before if before > 0 and after > 0 else None


HEADER = (
    f"{'window':>11} {'n':>5} {'model':>6} {'p50':>6} {'p99':>6} {'late':>4} {'age99':>6}"
    f" {'lag':>5} {'lost':>4}  sources / machine (% of all cores),"
    " processes (CPU % of a core, RSS MB)"
)


def row(window: Window) -> str:
    sources = " ".join(f"{k}={v}" for k, v in sorted(window.outcomes.items()))
    procs = " ".join(
        f"{name}={cpu:.0f}%/{rss:.0f}M" for name, (cpu, rss) in window.processes.items()
    )
    flag = f"  [{window.fault}]" if window.fault else ""
    broken = f"  BROKEN: {'; '.join(window.broken)}" if window.broken else ""
    return (
        f"{window.start_s:5.0f}-{window.end_s:<5.0f} {window.answers:5d}"
        f" {window.model_share:6.1%} {window.p50_ms:6.1f} {window.p99_ms:6.1f}"
        f" {window.late:4d} {window.feature_age_p99_ms:6.0f} {window.consumer_lag:5d}"
        f" {window.workers_lost:4d}  {sources}{flag}{broken}\n{'':>11} machine"
        f" busy={window.machine_busy_pct:.0f}% steal={window.machine_steal_pct:.1f}%"
        f" client-lag={window.client_send_lag_max_ms:.0f}ms"
        f" {procs}"
    )


def write_json(path: Path, summary: dict[str, object], windows: Sequence[Window]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**summary, "windows": [asdict(w) for w in windows]}
    path.write_text(json.dumps(doc, indent=1))


def process_table(windows: Sequence[Window], part_s: float, caption: str = "") -> str:
    """Each process group's CPU (% of a core) and RSS (MB), means over the steady windows
    of the run's first and last ``part_s`` (half the run when shorter), as markdown under
    ``caption`` and the machine's mean busy and steal shares; the stack's total leaves
    the soak's own client out."""
    span = min(part_s, (windows[-1].end_s if windows else 0.0) / 2)
    first, last = first_and_last(windows, span)
    names = list(dict.fromkeys(name for w in windows if not w.fault for name in w.processes))

    def cells(name_set: Sequence[str]) -> tuple[str, str]:
        cpu = [sum(mean_usage(part, n, 0) for n in name_set) for part in (first, last)]
        rss = [sum(mean_usage(part, n, 1) for n in name_set) for part in (first, last)]
        return f"{cpu[0]:.1f} / {cpu[1]:.1f}", f"{rss[0]:.0f} / {rss[1]:.0f}"

    rows: list[tuple[object, ...]] = [(name, *cells([name])) for name in names]
    stack = [name for name in names if name != "soak-client"]
    rows.append(("**the stack**", *(f"**{cell}**" for cell in cells(stack))))
    minutes = f"{span / 60:.0f} min" if span >= 60 else f"{span:.0f} s"
    busy = sum(w.machine_busy_pct for w in windows) / max(len(windows), 1)
    steal = sum(w.machine_steal_pct for w in windows) / max(len(windows), 1)
    machine = f"the machine {busy:.0f} % busy, host steal {steal:.2f} %"
    return f"{caption}{'; ' if caption else ''}{machine}:\n\n" + markdown_table(
        [
            "process group",
            f">CPU, % of one core (first / last {minutes})",
            f">RSS MB (first / last {minutes})",
        ],
        rows,
    )


def windows_table(windows: Sequence[Window], part_s: float) -> str:
    """The steady windows (outside a fault and the recovery after it) per ``part_s`` of
    the run, as markdown."""
    rows, share = [], Bounds().min_model_share
    end = windows[-1].end_s if windows else 0.0
    for start in range(0, int(end), int(part_s)):
        part = [w for w in windows if not w.fault and start <= w.start_s < start + part_s]
        if not part:
            continue
        p99s = sorted(w.p99_ms for w in part)
        rows.append((
            f"{start / 60:.0f}-{min(start + part_s, end) / 60:.0f}", len(part),
            sum(w.model_share >= share for w in part),
            f"{100 * min(w.model_share for w in part):.1f} %",
            f"{statistics.median(p99s):.1f} / {p99s[-1]:.1f}",
            f"{statistics.median(w.p50_ms for w in part):.1f}", sum(w.late for w in part),
            f"{max(w.feature_age_p99_ms for w in part):.0f} ms",
        ))  # fmt: skip
    header = ["minutes", ">steady windows", f">model ≥ {100 * share:.0f} %",
              ">model share, worst",
              "p99 ms, median / worst", ">p50 ms, median", ">late",
              ">feature age p99, worst"]  # fmt: skip
    return markdown_table(header, rows)


def availability(windows: Sequence[Window]) -> tuple[int, int]:
    """Calls answered OK within their deadline, and all calls (refused, failed and late
    ones count against it, as in the availability objective)."""
    calls = sum(w.answers for w in windows)
    answered = sum(n for w in windows for name, n in w.outcomes.items() if name in ANSWER_SOURCES)
    return answered, calls
