"""Run an action at most once per interval, and once more after the last request (a trailing update).

A model run reports thousands of status changes; the front end needs a few updates per second. The first request
after a quiet interval runs the action at once, in the caller's thread (so a slow model shows each step as it
happens); requests inside the interval ask for one run at the interval's end, so the last changes before a long
silence (a slow layer) still reach the screen. Those trailing runs happen on one daemon thread shared by every
throttle of the process, started on first use and idle while nothing is due: no thread is created per update,
and a busy main thread never waits for one to start. ipykernel sends widget messages from any thread.

In [1]: throttle = Throttle(render, interval=0.1)
In [2]: for change in changes:
   ...:     apply(change); throttle.request()        # renders at most 10 times a second
In [3]: throttle.flush()                             # render now; a trailing run still due is dropped
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import traceback
from typing import Callable


class Throttle:
    """Calls ``action`` at most once per ``interval`` seconds (see the module docstring).

    ``interval=0`` runs the action on every request, synchronously.

    Attributes:
        runs: how many times the action ran.
    """

    def __init__(self, action: Callable[[], None], interval: float):
        self.action = action
        self.interval = interval
        self.runs = 0
        self.pending = False
        self._last = float("-inf")
        self._ticket = 0
        self._running = threading.Lock()

    def request(self) -> None:
        """Ask for a run: now if the interval has passed, otherwise once at its end."""
        if self.pending:
            return
        due = self._last + self.interval
        if due <= time.monotonic() and self._run(wait=False):
            return
        self.pending = True
        self._ticket += 1
        _TRAILING.schedule(max(due, time.monotonic()), self, self._ticket)

    def flush(self) -> None:
        """Run now, in this thread (waiting for a trailing run in progress to end); a trailing run due is dropped."""
        self.pending = False
        self._run(wait=True)

    def cancel(self) -> None:
        """Drop a trailing run that is due (a run in progress on the other thread still ends)."""
        self.pending = False

    def trailing(self, ticket: int) -> None:
        """The trailing run asked for with ``ticket`` is due (called on the shared thread)."""
        if self.pending and ticket == self._ticket:
            self.pending = False
            self._run(wait=True)

    def _run(self, wait: bool) -> bool:
        if not self._running.acquire(blocking=wait):
            return False  # the other thread is running the action right now
        try:
            self._last = time.monotonic()
            self.runs += 1
            self.action()
        finally:
            self._running.release()
        return True


class _TrailingRuns:
    """The one daemon thread that runs every throttle's trailing runs at their time."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._due: list[tuple[float, int, Throttle, int]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, throttle: Throttle, ticket: int) -> None:
        with self._condition:
            heapq.heappush(self._due, (when, next(self._order), throttle, ticket))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="nnsight-magic-widget-updates", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._due:
                    self._condition.wait()
                when, _, throttle, ticket = self._due[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._condition.wait(delay)
                    continue
                heapq.heappop(self._due)
            try:
                throttle.trailing(ticket)
            except Exception:  # a failing update must not stop the updates of every other widget
                traceback.print_exc()

    def forget_thread(self) -> None:
        """In a forked child the thread is gone: start a new one on the next schedule."""
        self._condition = threading.Condition()
        self._due = []
        self._thread = None


_TRAILING = _TrailingRuns()
os.register_at_fork(after_in_child=_TRAILING.forget_thread)
