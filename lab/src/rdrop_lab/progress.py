"""A dependency-free progress line with an ETA for a whole suite of runs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Tracks work units done out of a planned total and prints a bar with an ETA.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    ``interval`` seconds (so logs stay readable).
    """

    def __init__(
        self, total_units: float, stream: TextIO | None = None, interval: float = 20.0
    ) -> None:
        self.total = max(float(total_units), 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.start = time.perf_counter()
        self._last_print = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.status = ""

    def add_total(self, units: float) -> None:
        self.total = max(self.total + units, self.done, 1e-9)

    def advance(self, units: float, status: str | None = None) -> None:
        self.done = min(self.done + units, self.total)
        if status is not None:
            self.status = status
        self._draw()

    def set_status(self, status: str) -> None:
        self.status = status
        self._draw(force=True)

    def eta_seconds(self) -> float | None:
        elapsed = time.perf_counter() - self.start
        if self.done <= 0:
            return None
        return elapsed * (self.total - self.done) / self.done

    def line(self) -> str:
        fraction = self.done / self.total
        width = 24
        filled = round(fraction * width)
        bar = "#" * filled + "-" * (width - filled)
        elapsed = time.perf_counter() - self.start
        eta = self.eta_seconds()
        eta_text = "--:--" if eta is None else format_seconds(eta)
        return (
            f"[{bar}] {100 * fraction:5.1f}% elapsed {format_seconds(elapsed)} "
            f"ETA {eta_text} | {self.status}"
        )

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._tty:
            if force or now - self._last_print > 0.2:
                self.stream.write("\r\033[K" + self.line()[:200])
                self.stream.flush()
                self._last_print = now
        elif force or now - self._last_print >= self.interval:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def message(self, text: str) -> None:
        """Print a full line above the bar."""
        if self._tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        if self._tty:
            self._draw(force=True)

    def close(self) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + self.line()[:200] + "\n")
            self.stream.flush()
