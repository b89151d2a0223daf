"""``StallWatch``: a thread that looks at what the event loop's thread is running while
the loop is stalled, so a stall can be logged with where it happened.

The loop's probe beats at every wake. The watch thread checks every ``check_s``; when the
beat is overdue by ``overdue_s`` it takes the loop thread's Python stack (once per stall).
A stall in Python code shows its line; one inside a C call (a blocking system call, a
long C extension call) shows the Python line that made the call. The thread takes the GIL
for a few microseconds ``1 / check_s`` times a second, and otherwise sleeps.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

FRAMES = 6  # innermost frames kept


class StallWatch:
    def __init__(self, *, overdue_s: float, check_s: float = 0.01) -> None:
        self._overdue_s = overdue_s
        self._check_s = check_s
        self._watched = threading.get_ident()  # constructed on the loop's thread
        self._beat = time.monotonic()
        self._seen_beat = 0.0  # the beat whose stall has been looked at
        self._where = ""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def beat(self) -> None:
        """The loop ran: called by its probe at every wake."""
        self._beat = time.monotonic()

    def take(self) -> str:
        """Where the loop's thread was during the last stall ("" if not seen), once."""
        where, self._where = self._where, ""
        return where

    def _watch(self) -> None:
        while not self._stopping.wait(self._check_s):
            beat = self._beat
            if beat != self._seen_beat and time.monotonic() - beat > self._overdue_s:
                self._seen_beat = beat
                frame = sys._current_frames().get(self._watched)
                if frame is not None:
                    stack = traceback.extract_stack(frame)[-FRAMES:]
                    self._where = " < ".join(
                        f"{entry.filename.rsplit('/', 1)[-1]}:{entry.lineno} {entry.name}"
                        for entry in reversed(stack)
                    )
