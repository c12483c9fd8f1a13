"""Progress on stderr: a bar on a terminal, a log line every ``LOG_INTERVAL`` s otherwise."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import TextIO

# Seconds between log lines when stderr is not a terminal (cron mail stays short).
try:
    LOG_INTERVAL = float(os.environ.get("AZFILTER_LOG_INTERVAL", "10"))
except ValueError:
    LOG_INTERVAL = 10.0


def plural(count: int, noun: str) -> str:
    """``"1 frame"``, ``"2 frames"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def duration(seconds: float) -> str:
    """Seconds as ``H:MM:SS``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Counts frames done and failed; shows a bar (terminal) or periodic lines (logs).

    Parameters
    ----------
    total : int
        Frames planned.
    quiet : bool
        Show nothing but :meth:`message` lines (failures).
    label : str
        What is running (``"sigma-clip shard 2/16"``).
    stream : file, optional
        Where to write (default: stderr).
    """

    def __init__(self, total: int, quiet: bool, label: str, stream: TextIO | None = None):
        self.total = total
        self.quiet = quiet
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.start = time.monotonic()
        self.done = 0
        self.failed = 0
        self.lock = threading.Lock()
        self._last_draw = 0.0
        self._last_log = self.start
        self._bar_shown = False
        if self.tty and not quiet and total:
            with self.lock:
                self._draw(self.start)   # something shows before the first frame is done
            self._last_draw = 0.0        # and the first frame redraws it

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False

    def message(self, text: str) -> None:
        """A line that is always shown (failures), above the bar."""
        with self.lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def step(self, failed: bool = False) -> None:
        """One frame finished (reduced, or failed)."""
        with self.lock:
            self.done += 1
            self.failed += int(failed)
            if self.quiet:
                return
            now = time.monotonic()
            if self.tty:
                if now - self._last_draw >= 0.1 or self.done == self.total:
                    self._draw(now)
            elif now - self._last_log >= LOG_INTERVAL and self.done < self.total:
                self._last_log = now
                # log files (cron mail, SLURM output) get a timestamp on each line
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                self.stream.write(f"{stamp} azfilter: {self.label}: {self._status(now)}\n")
                self.stream.flush()

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}/{self.total} frames, {rate:.1f} frames/s"
        if rate > 0 and self.done < self.total:
            eta = (self.total - self.done) / rate
            text += f", ETA {duration(eta)}"
        return text

    def _draw(self, now: float) -> None:
        self._last_draw = now
        status = self._status(now)
        # Fit the terminal: a line that wraps leaves a stale copy per update.
        columns = shutil.get_terminal_size((80, 24)).columns - 1
        width = min(30, columns - len(self.label) - len(status) - 4)
        if width >= 5:
            filled = int(width * self.done / self.total) if self.total else width
            line = f"{self.label} [{'#' * filled}{'-' * (width - filled)}] {status}"
        else:
            line = f"{self.label} {status}"[:max(columns, 1)]
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        """Remove the bar (the summary line follows)."""
        with self.lock:
            self._clear()
            self.stream.flush()
