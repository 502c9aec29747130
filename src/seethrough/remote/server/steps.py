"""Tell the API process how far a generation has come (``progress`` messages).

While a ``generate`` request runs, :class:`StepReporter` counts the forward
passes of the served model's top module — one per generated token, the
first also reading the prompt — and sends the count to the API process at
most every half second.  The API process publishes it as a ``status`` event
(``{"status": "running", "step": N}``), which the client shows beside the
time so far.  The hook is removed before the request's result is checked,
so the model is left as it was.
"""

from __future__ import annotations

import time
from typing import Any

from . import framing

__all__ = ["StepReporter"]

_EVERY_S = 0.5


class StepReporter:
    """A context manager counting ``module``'s forward passes and reporting them over ``conn``."""

    def __init__(self, conn: Any, module: Any) -> None:
        self.conn = conn
        self.module = module
        self.steps = 0
        self._sent = 0.0
        self._handle: Any = None

    def _count(self, *_: Any) -> None:
        self.steps += 1
        now = time.monotonic()
        if now - self._sent >= _EVERY_S:
            self._sent = now
            try:
                self.conn.send_bytes(framing.encode("progress", step=self.steps))
            except (OSError, ValueError):  # the API's end is gone: the request ends anyway
                pass

    def __enter__(self) -> "StepReporter":
        self._sent = time.monotonic()  # the first report once a generation has run half a second
        self._handle = self.module.register_forward_hook(self._count)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
