"""One progress line for every long job (tqdm when installed, a plain fallback otherwise).

On a terminal the line redraws in place a few times a second; into a log file (no
terminal) it writes a whole line every ``log_interval`` seconds, so lines never run
together.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``update(n)`` after each step of ``n`` units, ``close()`` at the end.

    ``total`` may be ``None`` (unknown); ``done`` starts the count (a resumed job);
    ``enabled=None`` shows it only on a terminal. ``use_tqdm=False`` forces the fallback.
    """

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        unit: str = "images",
        done: int = 0,
        enabled: bool | None = True,
        stream: TextIO | None = None,
        use_tqdm: bool = True,
        log_interval: float = 10.0,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.start_done = done
        self.start = self.last = time.perf_counter()
        self.interval = 0.1 if self.tty else log_interval
        self.bar = self._tqdm(use_tqdm) if self.enabled else None

    def _tqdm(self, wanted: bool):
        if not (wanted and self.tty):
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total, initial=self.done, unit=self.unit, desc=self.desc,
                    file=self.stream)  # fmt: skip

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The text of the progress line: count, rate and, with a total, percent and ETA."""
        now = time.perf_counter() if now is None else now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        text = f"{self.desc}: {self.done}"
        if self.total:
            left = max(self.total - self.done, 0)
            if rate > 0:
                s = round(left / rate)
                eta = f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
            else:
                eta = "-:--:--"
            pct = 100.0 * self.done / self.total
            text += f"/{self.total} {self.unit} ({pct:5.1f}%) {rate:9.1f} {self.unit}/s  ETA {eta}"
        else:
            text += f" {self.unit}, {rate:.1f} {self.unit}/s"
        return text

    def _draw(self, now: float) -> None:
        self.stream.write(self.line(now) + ("\r" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
