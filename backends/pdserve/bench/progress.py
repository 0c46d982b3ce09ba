"""A one-line progress bar on stderr, with no extra dependency.

Off when stderr is not a terminal (logs, CI) or with ``--no-progress``; it
redraws at most ten times a second so it never competes with the client.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from pdserve.bench.records import RequestRecord

_BAR_WIDTH = 30
_MIN_REDRAW_S = 0.1


class Progress:
    """Counts started and finished requests and draws them against a total or a duration."""

    def __init__(
        self,
        total: int | None,
        max_duration_s: float | None,
        enabled: bool = True,
        stream: TextIO | None = None,
        label: str = "bench",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.total = total
        self.max_duration_s = max_duration_s
        self.label = label
        self.num_started = 0
        self.num_done = 0
        self.num_failed = 0
        self._start = time.monotonic()
        self._last_draw = 0.0

    @staticmethod
    def is_tty(stream: TextIO | None = None) -> bool:
        s = stream if stream is not None else sys.stderr
        return bool(getattr(s, "isatty", lambda: False)())

    @property
    def num_in_flight(self) -> int:
        return self.num_started - self.num_done

    def started(self) -> None:
        self.num_started += 1
        self._draw()

    def finished(self, record: RequestRecord) -> None:
        self.num_done += 1
        if not record.is_ok:
            self.num_failed += 1
        self._draw()

    def fraction(self) -> float | None:
        elapsed = time.monotonic() - self._start
        parts = []
        if self.total:
            parts.append(self.num_done / self.total)
        if self.max_duration_s:
            parts.append(elapsed / self.max_duration_s)
        return min(1.0, max(parts)) if parts else None

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        frac = self.fraction()
        bar = ""
        if frac is not None:
            filled = int(frac * _BAR_WIDTH)
            bar = "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + f"] {frac * 100:3.0f}% "
        total = f"/{self.total}" if self.total else ""
        return (
            f"{self.label} {bar}{self.num_done}{total} done, {self.num_in_flight} in flight, "
            f"{self.num_failed} failed, {elapsed:.1f} s"
        )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < _MIN_REDRAW_S:
            return
        self._last_draw = now
        self.stream.write("\r" + self.line() + "\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
