"""A fair queue per model: round-robin across API keys.

Each key (the API key's digest, or the client's address on an open server)
has its own first-in-first-out line; :meth:`FairQueue.get` takes the next
request from the next key in turn, so one user submitting a hundred requests
does not make another wait behind all of them.  The queue is thread-safe:
the API's event loop puts, the model's dispatcher threads get.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Hashable

__all__ = ["FairQueue", "QueueFull"]


class QueueFull(Exception):
    """The queue holds as many requests as it may (in total or for one key)."""


class FairQueue:
    """Round-robin over keys, FIFO within a key."""

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self._lines: dict[Hashable, deque] = {}
        self._turns: deque = deque()  # keys with waiting items, in the order they are served
        self._size = 0
        self._closed = False
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return self._size

    def put(self, key: Hashable, item: Any) -> int:
        """Queue ``item`` for ``key``; return its position (1 = next).  Raises :class:`QueueFull`."""
        with self._ready:
            if self._size >= self.max_total:
                raise QueueFull(f"the queue for this model is full ({self.max_total} requests waiting)")
            line = self._lines.get(key)
            if line is not None and len(line) >= self.max_per_key:
                raise QueueFull(f"you already have {len(line)} requests waiting for this model (the most one "
                                "API key may have)")
            if line is None:
                line = self._lines[key] = deque()
                self._turns.append(key)
            line.append(item)
            self._size += 1
            position = self._position_of(item)
            self._ready.notify()
            return position

    def get(self, timeout: float | None = None) -> Any:
        """The next item in turn; None after ``timeout`` seconds or once closed."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._size or self._closed, timeout):
                return None
            if self._closed and not self._size:
                return None
            key = self._turns.popleft()
            line = self._lines[key]
            item = line.popleft()
            if line:
                self._turns.append(key)
            else:
                del self._lines[key]
            self._size -= 1
            return item

    def drain(self) -> list:
        """Remove and return every waiting item."""
        with self._ready:
            items = [item for key in self._turns for item in self._lines[key]]
            self._lines.clear()
            self._turns.clear()
            self._size = 0
            return items

    def close(self) -> None:
        """Wake every waiting :meth:`get` (they return None from now on when empty)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def positions(self, limit: int | None = None) -> list[Any]:
        """The waiting items in the order they will run (the first ``limit`` of them)."""
        with self._ready:
            return self._order(limit)

    def _order(self, limit: int | None) -> list[Any]:
        lines = [self._lines[key] for key in self._turns]
        order: list[Any] = []
        depth = 0
        while lines and (limit is None or len(order) < limit):
            lines = [line for line in lines if depth < len(line)]
            for line in lines:
                order.append(line[depth])
                if limit is not None and len(order) >= limit:
                    break
            depth += 1
        return order

    def _position_of(self, item: Any) -> int:
        for index, other in enumerate(self._order(None), 1):
            if other is item:
                return index
        return self._size

    def remove(self, item: Any) -> bool:
        """Take ``item`` out of the queue (a cancelled request); False if it is not waiting."""
        with self._ready:
            for key, line in self._lines.items():
                if any(other is item for other in line):
                    line.remove(item)
                    self._size -= 1
                    if not line:
                        del self._lines[key]
                        self._turns.remove(key)
                    return True
            return False
