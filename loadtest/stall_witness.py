"""``python -m loadtest.stall_witness``: a process that does nothing but wake every few
milliseconds, and writes down each wake that came late.

It has no work of its own, so a late wake means the kernel gave it no CPU: every core
was busy with processes of its priority or higher, or the host took the CPU from the VM.
The soak runs one beside the stack; a stall that the decision server logs at the same
time as this witness is the machine's, not the server's. Each line written is
``UNIX_TIME LATE_MS``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def watch(interval_s: float, report_ms: float) -> None:
    due = time.monotonic() + interval_s
    while True:
        time.sleep(max(0.0, due - time.monotonic()))
        late_ms = (time.monotonic() - due) * 1000
        if late_ms >= report_ms:
            sys.stdout.write(f"{time.time():.3f} {late_ms:.1f}\n")
            sys.stdout.flush()
        due = time.monotonic() + interval_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--report-ms", type=float, default=10.0, help="write wakes this late")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    watch(args.interval_ms / 1000, args.report_ms)


if __name__ == "__main__":
    main()
