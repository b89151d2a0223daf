"""``python -m checks.profile`` (``make profile``): where a decision server's CPU goes.

Starts the benchmark's servers (``loadtest.bench``) for the Decide paths asked for (Y:
Decide on Triton; Q: the same on DecideStream; F: the breakers forced open, no model
call), drives each at a fixed
open-loop rate and samples its server with py-spy, native frames on: a flame graph a path
(``docs/img/profile-KEY.svg``) and a table of CPU a decision, by thread from /proc and,
for the event loop's thread, by stage from the samples (docs/profile.md). A sample goes
to the stage of the innermost frame of this repository on its stack; one with none, to
the library at its leaf.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from loadtest import bench
from loadtest.feature_keeper import fresh_features
from loadtest.loadgen import LoadGenerator, LoadSpec
from loadtest.report import answered_by, markdown_table, write_block
from loadtest.soak_probe import group_cpu_seconds
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
# Each stage's modules, by their paths in the repository; the first stage to hold a
# frame's file takes it.
STAGES = {
    "audit record": "server/audit/",
    "features (Redis)": "server/features.py server/redis_clients.py feature_cache/",
    "model call (client, batching, breaker)": "server/model_client.py server/oip.py"
    " server/batching.py server/replica server/router.py server/breaker server/model_errors.py",
    "shadow": "server/shadow.py",
    "metrics, logs, traces": "server/rpc_metrics.py server/load_metrics.py server/telemetry.py"
    " server/call_tally.py server/tracing.py core/logs.py",
    "call slots (grpc.aio serving)": "server/intake.py",
    "decision (servicer, engine, ladder, validation)": "server/ fallback/ core/",
}
# Under every sample (the process's entry), or not ours (a virtualenv in the checkout).
NOT_STAGES = ("server/__main__.py", ".venv/", ".tools/")
LIBRARIES = (  # marks in a frame's file
    ("gRPC, outside our calls", ("/grpc/", "cygrpc")),
    ("event loop (uvloop, asyncio)", ("/uvloop/", "/asyncio/")),
)
OTHER = "other (interpreter, collector, libc)"
# py-spy pauses the server to read each sample's native stack: at 1,000 Decide/s on a
# 2-core VM, 20 a second (of the thread holding the GIL) left 0-1.6 % of calls late, 50 a
# second up to 2 %, 200 a second of every thread most of them.
SAMPLES_PER_S = 20
POOL_NUMBER = re.compile(r"[\d_-]+$")  # event_engine-3, default-executor_1
SPY_WAIT_S = 30.0  # py-spy writes its file a second or two after its duration
WARM_S = 5.0  # each path's unsampled run before its sampled ones
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time


def stage_of(stack: str) -> str:
    """The stage of one sample: py-spy's raw frames, root first, joined by ``;``."""
    frames = stack.split(";")[::-1]
    for frame in frames:
        file = frame.rpartition("(")[2].rpartition(":")[0]
        relative = file.removeprefix(f"{REPO}/")
        if relative != file and not relative.startswith(NOT_STAGES):
            found = (s for s, mods in STAGES.items() if relative.startswith(tuple(mods.split())))
            return next(found, "other code of ours")
    for frame in frames:
        for library, marks in LIBRARIES:
            if any(mark in frame for mark in marks):
                return library
    return OTHER


def stages(raw: str) -> Counter[str]:
    """The main thread's samples (the event loop's) by stage, from py-spy's raw output
    with thread names and full file names (``thread (TID): NAME;frame;... COUNT``)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack.partition(";")[0].endswith(": MainThread") and count.isdigit():
            counts[stage_of(stack)] += int(count)
    return counts


def thread_name(comm: str, process: str) -> str:
    """A thread's row: its kernel name less a pool's numbering; threads that kept the
    process's own name (Python 3.11 names none of its threads) share one row."""
    if comm == process:
        return "other threads (Python names none)"
    return "thread " + POOL_NUMBER.sub("", comm)


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid`` by ``thread_name``, the main thread as
    ``event loop``, and the whole process's (threads that ended included) as ``process``."""

    def read(stat: Path) -> tuple[str, float]:
        comm, _, rest = stat.read_text().rpartition(")")
        fields = rest.split()
        return comm.partition("(")[2], (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    process, seconds = read(Path(f"/proc/{pid}/stat"))
    threads: defaultdict[str, float] = defaultdict(float, {"process": seconds})
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm, used = read(task / "stat")
        except OSError:  # ended meanwhile
            continue
        threads["event loop" if task.name == str(pid) else thread_name(comm, process)] += used
    return dict(threads)


async def sampled(
    pid: int, generator: LoadGenerator, spec: LoadSpec, output: Path, *options: str
) -> tuple[str, int]:
    """``spec``'s load with py-spy on ``pid`` for all of it, writing ``output``; what the
    callers saw, in words, and the calls sent (the warm-up's included)."""
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("py-spy")), "record", "--native", "--gil",
        "--pid", str(pid), "--rate", str(SAMPLES_PER_S), "--duration",
        str(round(spec.warmup_s + spec.seconds)), "--output", str(output), *options,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        result = await asyncio.to_thread(generator.run, spec)
        _, errors = await asyncio.wait_for(spy.communicate(), SPY_WAIT_S)
    finally:
        if spy.returncode is None:  # the load failed, or py-spy hung: it ends with us
            spy.kill()
            await spy.wait()
    if spy.returncode:
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {errors.decode()[-500:]}")
    sent = result.ok + result.error_count
    seen = (
        f"{output.stem}, sampled to {output.suffix[1:]}: {result.throughput_per_s:,.0f}/s"
        f" p50 {result.percentile_ms(50):.2f} p99 {result.percentile_ms(99):.2f} ms, errors"
        f" {result.error_count} of {sent:,}, {answered_by(result) or 'no answers'}"
    )
    print(f"  {seen}", flush=True)
    return seen, sent + round(spec.rate_per_s * spec.warmup_s)


async def profile(
    fleet: bench.Fleet, generator: LoadGenerator, args: argparse.Namespace, run_dir: Path
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Each path: raw samples and each thread's CPU in one run, a flame graph in another;
    the table's rows and what each run's callers saw."""
    rows: list[tuple[str, ...]] = []
    runs: list[str] = []
    control = bench.Control(fleet)
    try:
        async with fresh_features(fleet.redis_url, Settings().redis.key_prefix):
            for key in args.paths:
                await control.prepare(key)
                preset = bench.Preset(paths=(key,), rates=(args.rate,), seconds=args.seconds)
                spec = bench.spec_for(fleet, (key, "open", args.rate), preset, args)
                pid = fleet.servers[bench.path_of(key).server].process.pid or 0
                groups = fleet.groups(key)
                raw = run_dir / f"profile-{key}.txt"
                # Unsampled first: the model server warm and the breakers closed.
                await asyncio.to_thread(generator.run, replace(spec, seconds=WARM_S))
                before = thread_seconds(pid)
                processes = group_cpu_seconds(groups, bench.SHIPPER)
                seen, calls = await sampled(pid, generator, spec, raw, "--format", "raw",
                                            "--threads", "--full-filenames")  # fmt: skip
                runs.append(seen)
                us = {k: (v - before.get(k, 0.0)) * 1e6 / calls
                      for k, v in thread_seconds(pid).items()}  # fmt: skip
                after = group_cpu_seconds(groups, bench.SHIPPER)
                shipper, model = ((after[i] - processes[i]) * 1e6 / calls for i in (1, 2))
                svg = args.svg_dir / f"profile-{key}.svg"
                runs.append((await sampled(pid, generator, spec, svg))[0])
                rows += table_rows(key, stages(raw.read_text()), us, shipper, model)
    finally:
        await control.close()
    return rows, runs


def table_rows(
    key: str, counts: Counter[str], us: dict[str, float], shipper: float, model: float
) -> list[tuple[str, ...]]:
    """``us``: µs a call by ``thread_seconds``' names; the process's beyond its live
    threads' is what threads that ended during the run used."""
    loop, total = us.pop("event loop", 0.0), sum(counts.values()) or 1
    ended = us.pop("process", 0.0) - loop - sum(us.values())
    rows: list[tuple[str, ...]] = [(key, "event loop, all", f"{total:,} samples", f"{loop:,.0f}")]
    rows += [(key, f"event loop: {stage}", f"{100 * n / total:.1f} %", f"{loop * n / total:,.0f}")
             for stage, n in counts.most_common()]  # fmt: skip
    rows += [(key, name, "", f"{v:,.0f}") for name, v in sorted(us.items(), key=lambda kv: -kv[1])
             if abs(v) >= 1]  # fmt: skip
    if abs(ended) >= 1:
        rows.append((key, "threads that ended during the run", "", f"{ended:,.0f}"))
    rows += [(key, "audit shipper (process)", "", f"{shipper:,.0f}"),
             (key, "model server (process)", "", f"{model:,.0f}")]  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=lambda t: t.split(","), default=["Y", "Q", "F"],
                        help="Decide paths of loadtest.bench (default Y,Q,F)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=1000.0, help="Decide calls a second")
    parser.add_argument("--seconds", type=float, default=60.0, help="each run's (two a path)")
    parser.add_argument("--svg-dir", type=Path, default=REPO / "docs/img")
    parser.add_argument("--doc", type=Path, help="put the table in this doc's profile block")
    ours = parser.parse_args(argv)
    for key in ours.paths:
        path = bench.path_of(key)
        if path.target not in ("decide", "stream") or bench.workers_of(path.server) > 1:
            parser.error(f"{key}: a Decide path of one worker process (py-spy samples one)")
    args, _ = bench.parse(["paths"])  # the bench's defaults: load generator, model server
    args.__dict__.update(vars(ours))
    generator = LoadGenerator(args.processes)
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        try:
            generator.start()
            with bench.fleet_started(Path(tmp), args.paths, args) as fleet:
                generator.wait_ready()
                rows, runs = asyncio.run(profile(fleet, generator, args, Path(tmp)))
        finally:
            generator.stop()
    header = ["path", "where", ">event loop's samples", ">µs a decision"]
    caption = f"{args.rate:,.0f} Decide/s a path, {args.seconds:g} s a run:\n"
    table = "\n".join([caption, markdown_table(header, rows), "", *(f"- {r}" for r in runs)])
    print(f"\n{table}")
    if args.doc:
        write_block(args.doc, "profile", table)


if __name__ == "__main__":
    main()
