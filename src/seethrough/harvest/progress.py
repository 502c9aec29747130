"""The harvest's progress line on stderr: prompts, tokens/s, disk written, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line, redrawn at most every ``every`` seconds (or printed plainly
    when the stream is not a terminal)."""

    def __init__(self, total: int | None, enabled: bool = True, stream: TextIO | None = None, every: float = 0.5) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.prompts = 0
        self.tokens = 0
        self.skipped = 0
        self.written = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def skip(self, prompts: int) -> None:
        """Prompts of shards a resumed run found complete."""
        self.skipped += prompts
        self.prompts += prompts

    def update(self, prompts: int = 0, tokens: int = 0, written: int = 0) -> None:
        self.prompts += prompts
        self.tokens += tokens
        self.written += written
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._draw(final=False)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.tokens / elapsed
        done = self.prompts - self.skipped
        total = f"/{self.total:,}" if self.total is not None else ""
        text = f"harvest {self.prompts:,}{total} prompts  {rate:,.0f} tok/s  {_size(self.written)} written"
        if self.total is not None and done > 0:
            left = (self.total - self.prompts) * elapsed / done
            text += f"  ETA {_clock(left)}"
        return text

    def _draw(self, final: bool) -> None:
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            if self._tty:
                self.stream.write("\r\033[K")
            self.stream.write(f"harvest: {text}\n")
            self.stream.flush()

    def close(self) -> None:
        self._draw(final=True)
