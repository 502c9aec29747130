"""A request's events on disk: appended as JSON lines, read back from any index.

Every server-sent event of a request (``status``, ``log``, ``completed``,
``error``) goes to ``<id>.events`` in the spool folder as it happens; the API
process keeps only where each event starts (one integer per event), so the
lines a body prints are never held whole in memory, however many requests
print at once.  A late subscriber replays the file from its start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

__all__ = ["EventLog"]

_READ_LIMIT = 256 * 1024  # bytes one read hands to a stream (the rest on its next read)


class EventLog:
    """The events of one request (callers hold the store's lock around appends)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._starts: list[int] = []
        self._size = 0

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        return iter(self.read(0, limit=None))

    def append(self, name: str, data: dict) -> None:
        line = json.dumps([name, data], separators=(",", ":")).encode("utf-8") + b"\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
        self._starts.append(self._size)
        self._size += len(line)

    def read(self, start: int, limit: int | None = _READ_LIMIT) -> list[tuple[str, dict]]:
        """Events from index ``start`` on (at least one if there is one; about ``limit`` bytes)."""
        count = len(self._starts)
        if start >= count:
            return []
        first, end = self._starts[start], self._size
        if limit is not None and end - first > limit:
            stop = start + 1
            while stop < count and self._starts[stop] - first <= limit:
                stop += 1
            end = self._starts[stop] if stop < count else self._size
        try:
            with open(self.path, "rb") as handle:
                handle.seek(first)
                data = handle.read(end - first)
        except FileNotFoundError:  # the request was forgotten meanwhile
            return []
        events = []
        for line in data.splitlines():
            name, payload = json.loads(line)
            events.append((name, payload))
        return events

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
