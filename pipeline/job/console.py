"""What a library job shows while it runs.

Progress: photos done out of the total, failed and left alone so far, the rate, the time left;
one live line on a terminal (rich), a plain line every LOG_SECONDS where the output is a log.
Ray's native lines that say nothing to the user are kept off the console (without_native_noise).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TextIO

from ..manifest import FAILED, SKIPPED

LOG_SECONDS = 10.0  # a plain line this often when the output is not a terminal
RATE_WINDOW_SECONDS = 60.0  # the rate is that of the last minute: time left follows changes of pace
MIN_RATE_SECONDS = 5.0


def duration(seconds: float) -> str:
    if seconds < 60:
        return "under 1 min"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(
    done: int, total: int, failed: int, left_alone: int, rate: float | None, listing: bool = False
) -> str:
    """e.g. `1,204/20,000 photos · 3 failed · 41 left alone · 7.9 photos/s · 39 min left`; while
    the listing goes on the total is what it found so far: `1,204/20,000+ photos · ... · listing`"""
    parts = [f"{done:,}/{total:,}{'+' if listing else ''} photos", f"{failed:,} failed", f"{left_alone:,} left alone"]
    if rate is None:
        parts.append("starting" if done == 0 else "measuring speed")
    else:
        parts.append(f"{rate:.1f} photos/s")
        if listing:  # no time left until the total is known
            parts.append("listing")
        elif done >= total:
            parts.append("done")
        else:
            parts.append(f"{duration((total - done) / rate)} left" if rate > 0 else "stalled")
    return " · ".join(parts)


class Progress:
    """Counts rows as the driver commits them; show() draws or logs the line (call it often)."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        listing: bool = False,
    ) -> None:
        self.total, self.listing = total, listing
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = self.failed = self.left_alone = 0
        self.finished: deque[tuple[float, int]] = deque()  # (when, done) for the rate
        self.started = clock()
        self.last_logged = float("-inf")
        self._lock = threading.Lock()
        self.live = self._live() if self.stream.isatty() else None

    def _live(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        live = Progress(
            BarColumn(), TextColumn("{task.description}"), console=Console(file=self.stream), auto_refresh=False
        )
        self.task = live.add_task(self.line(), total=self.total)
        live.start()
        return live

    def add(self, status: str, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self.failed += n * (status == FAILED)
            self.left_alone += n * (status == SKIPPED)
            self.finished.append((self.clock(), self.done))

    def set_total(self, total: int, listing: bool) -> None:
        """The photos planned so far, and whether the listing goes on (the total grows with it)."""
        with self._lock:
            self.total, self.listing = total, listing

    def rate(self) -> float | None:
        """Photos per second since the last finish at least RATE_WINDOW_SECONDS ago (or the
        first one); None for the first MIN_RATE_SECONDS after the first photo is done."""
        now = self.clock()
        while len(self.finished) > 1 and self.finished[1][0] <= now - RATE_WINDOW_SECONDS:
            self.finished.popleft()
        if not self.finished or now - self.finished[0][0] < MIN_RATE_SECONDS:
            return None
        since, done_then = self.finished[0]
        return (self.done - done_then) / (now - since)

    def line(self) -> str:
        return progress_line(self.done, self.total, self.failed, self.left_alone, self.rate(), self.listing)

    def _draw(self, line: str, to_log: bool) -> None:
        """Redraw the live line on a terminal; in a log, print it when `to_log`."""
        if self.live is not None:
            self.live.update(self.task, completed=self.done, total=self.total, description=line, refresh=True)
        elif to_log:
            self.last_logged = self.clock()
            print(line, file=self.stream, flush=True)

    def show(self) -> None:
        with self._lock:
            self._draw(self.line(), to_log=self.clock() - self.last_logged >= LOG_SECONDS)

    def close(self) -> None:
        """The final line, in logs too, with the rate of the whole run."""
        with self._lock:
            elapsed = self.clock() - self.started
            rate = self.done / elapsed if elapsed > 0 else None
            line = progress_line(self.done, self.total, self.failed, self.left_alone, rate, self.listing)
            self._draw(line, to_log=True)
        if self.live is not None:
            self.live.stop()


# Lines Ray's C++ core writes straight to the driver's stderr that need no action from a user:
# Ray Data hands every actor pool's transformer to its actors through the object store, which
# the core reports as an error once per process (github.com/ray-project/ray/issues/53727).
NATIVE_NOISE = ("has constructor arguments in the object store",)


@contextlib.contextmanager
def without_native_noise(noise: tuple[str, ...] = NATIVE_NOISE) -> Iterator[TextIO]:
    """Within: file descriptor 2 goes through a filter that drops lines holding `noise` and
    passes the rest on at once. Yields the console's own stderr (for a live progress line)."""
    console = os.fdopen(os.dup(2), "w", buffering=1)
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(text.encode() in line for text in noise):
                    os.write(console.fileno(), line)

    forwarder = threading.Thread(target=forward, name="dreamfocus-stderr", daemon=True)
    forwarder.start()
    try:
        yield console
    finally:
        sys.stderr.flush()
        os.dup2(console.fileno(), 2)  # closes the pipe's last write end: the forwarder ends
        forwarder.join(timeout=5)
        console.close()
