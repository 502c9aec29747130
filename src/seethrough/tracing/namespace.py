"""The namespaces trace bodies run in, and how names flow between invokes.

A captured body runs as module-level code in a :class:`BodyNamespace`: a dict
seeded with the caller's local variables that falls back to the caller's
globals, so functions and comprehensions defined in the body see every name.

Invokes of one trace all run during the same forward pass, yet their code
reads as if it ran one block after the other:

.. code-block:: python

    with model.trace() as tracer:
        with tracer.invoke("The cat"):
            cat = model.layers[6].output.save()
        with tracer.invoke("The dog"):
            model.layers[6].output[:] = cat        # needs invoke 1's `cat`

:class:`CrossFlow` gives that reading.  Each invoke gets a snapshot of the
trace body's variables at the point it was opened (loop variables included).
When an invoke reads a name that an earlier invoke assigns, it waits (its
greenlet sleeps) until that invoke has assigned it, then reads the current
value.  Code of the trace body after the invokes waits until they have ended.
Which invoke "comes before" is the order of the source, as in plain Python.

A value read that way is the one assigned so far.  Should the earlier invoke
assign the name again after a later invoke read it, the reader would go on
with a stale value: the assignment fails with a :class:`CrossInvokeError`
naming both lines (the writer's namespace becomes a :class:`WatchedNamespace`
once a running invoke's name has been read, so traces that share nothing pay
nothing).  A barrier (``tracer.barrier(n)``, see :mod:`.barrier`) is how a
reader asks for the value at a chosen point instead: when n invokes meet
there, each one's reads from earlier participants are pinned to their values
at that moment (:meth:`CrossFlow.synchronise`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .._frames import describe_location, user_frame
from ..errors import CrossInvokeError, TraceSourceError
from .capture import RETURN_REACHED
from .prefetch import PREFETCH, PREFETCH_LOOP, PREFETCH_RUN, prefetch, prefetch_loop, prefetch_run
from .runtime import SAVE_METHOD, save_method

if TYPE_CHECKING:
    from .capture import CapturedBlock
    from .interleaver import Interleaver
    from .tasks import Task

_contains = dict.__contains__
_getitem = dict.__getitem__


class BodyNamespace(dict):
    """Globals-and-locals of a running body; misses fall back to the caller's
    globals, or to a resolver that knows about other invokes."""

    # `watch` is used by WatchedNamespace only; declared here so that a
    # running invoke's namespace can become one (same layout).
    __slots__ = ("fallback", "resolver", "watch")

    def __init__(self, seed: dict, fallback: dict) -> None:
        super().__init__(seed)
        # What the body's rewritten `X.save()` calls (see .capture).
        dict.__setitem__(self, SAVE_METHOD, save_method)
        dict.__setitem__(self, PREFETCH, prefetch)  # what runs of plain saves compile to (.prefetch)
        dict.__setitem__(self, PREFETCH_RUN, prefetch_run)
        dict.__setitem__(self, PREFETCH_LOOP, prefetch_loop)
        dict.__setitem__(self, RETURN_REACHED, TraceSourceError)  # what a reached `return` raises (.capture)
        self.fallback = fallback
        self.resolver: Any = None

    def __missing__(self, name: str) -> Any:
        resolver = self.resolver
        if resolver is not None:
            return resolver(name)
        return self.fallback[name]

    def __repr__(self) -> str:  # a namespace can be huge; keep debugger views short
        return f"<trace namespace with {len(self)} names>"


class WatchedNamespace(BodyNamespace):
    """The namespace of an invoke whose names later invokes have read while it
    ran: assigning such a name again fails instead of leaving the readers with
    a stale value.  (``del`` of such a name is let through: Python turns any
    error raised there into a NameError; assigning it again afterwards fails.)

    ``watch`` maps a name to ``{reader index: (reader label, writer label,
    file, line of the read)}``."""

    __slots__ = ()

    def __setitem__(self, name: str, value: Any) -> None:
        readers = self.watch.get(name)
        if readers and not (_contains(self, name) and _getitem(self, name) is value):
            raise CrossInvokeError(_stale_message(name, readers, sys._getframe(1)))
        dict.__setitem__(self, name, value)


def _stale_message(name: str, readers: dict, frame: Any) -> str:
    reader, writer, filename, lineno = next(iter(readers.values()))
    user = user_frame(frame)
    at = describe_location(user.f_code.co_filename, user.f_lineno) if user is not None else "in your code"
    return (
        f"`{name}` was assigned again in {writer} (at {at}) after {reader} had read it "
        f"(at {describe_location(filename, lineno)}), so {reader} went on with a value that is not "
        f"{writer}'s any more. Invokes run side by side in one forward pass: a later invoke reads an "
        f"earlier invoke's name as soon as it is assigned. To hand over the value from a chosen point, "
        f"synchronise the two invokes with a barrier: `b = tracer.barrier(2)` before the invokes, "
        f"`b()` in {writer} right after the assignment whose value {reader} needs, and `b()` in "
        f"{reader} before it reads `{name}` (in a loop, one barrier per step: "
        "`bs = [tracer.barrier(2) for _ in steps]`). Or keep each value under its own name "
        "(a list or dict entry)."
    )


class TracedNamespace(BodyNamespace):
    """The trace body's namespace when it opens invokes: remembers, for each
    name, how many invokes had been opened when it was last assigned."""

    __slots__ = ("segment", "store_segment", "side")

    def __init__(self, seed: dict, fallback: dict) -> None:
        super().__init__(seed, fallback)
        self.segment = 0
        self.store_segment: dict[str, int] = {}
        self.side: dict[str, Any] = {}

    def __setitem__(self, name: str, value: Any) -> None:
        self.store_segment[name] = self.segment
        dict.__setitem__(self, name, value)

    def __delitem__(self, name: str) -> None:
        self.store_segment[name] = self.segment
        self.side.pop(name, None)
        dict.__delitem__(self, name)


class CrossFlow:
    """Program-order name flow between a trace body (task 0) and its invokes."""

    def __init__(self, interleaver: "Interleaver", body: "Task", globals_: dict) -> None:
        self.interleaver = interleaver
        self.body = body
        self.globals = globals_
        self.invokes: list[Task] = []
        self.stores: dict[int, frozenset[str]] = {}
        # Per invoke position: (its cross-invoke names -> body segment, its pins).
        self.readers: dict[int, tuple[dict, dict]] = {}
        self.position_of: dict[int, int] = {}  # task index -> invoke position
        ns = body.ns
        if isinstance(ns, TracedNamespace):
            ns.resolver = self._body_resolver

    def invoke_namespace(self, captured: "CapturedBlock") -> tuple[BodyNamespace, dict, dict]:
        """The namespace of the invoke being opened now, as the trace body sees it."""
        body_ns = self.body.ns
        side0 = body_ns.side if isinstance(body_ns, TracedNamespace) else {}
        full = {**side0, **dict(body_ns)}
        earlier_stores: set[str] = set()
        for names in self.stores.values():
            earlier_stores |= names
        cross = (captured.loaded & earlier_stores)
        special = captured.stored | cross
        seed = {name: value for name, value in full.items() if name not in special}
        side = {name: full[name] for name in special if name in full}
        segments = body_ns.store_segment if isinstance(body_ns, TracedNamespace) else {}
        cross_segments = {name: segments.get(name, -1) for name in cross}
        return BodyNamespace(seed, self.globals), side, cross_segments

    def add_invoke(self, task: "Task", captured: "CapturedBlock", side: dict, cross_segments: dict) -> None:
        position = len(self.invokes) + 1
        self.invokes.append(task)
        self.stores[position] = captured.stored
        self.position_of[task.index] = position
        pins: dict[str, Any] = {}  # names pinned by barriers (see `synchronise`)
        self.readers[position] = (cross_segments, pins)
        task.ns.resolver = self._invoke_resolver(task, position, side, cross_segments, pins)
        body_ns = self.body.ns
        if isinstance(body_ns, TracedNamespace):
            # Names this invoke may assign are, for the code after it, the invoke's.
            for name in captured.stored:
                if _contains(body_ns, name):
                    body_ns.side[name] = dict.pop(body_ns, name)
            body_ns.segment = position

    # -- resolvers (run inside the reading task's greenlet) ---------------------
    def _invoke_resolver(self, task: "Task", position: int, side: dict, cross_segments: dict, pins: dict) -> Any:
        fallback = self.globals

        def resolve(name: str) -> Any:
            segment = cross_segments.get(name)
            if segment is not None:
                if pins and name in pins:
                    return pins[name]  # as it was at the last barrier shared with its writer
                for writer_position in range(position - 1, 0, -1):
                    if name not in self.stores[writer_position]:
                        continue
                    if writer_position <= segment:
                        break  # the trace body assigned it after that invoke
                    writer = self.invokes[writer_position - 1]
                    found, value = self._wait_for(task, writer, name, until_done=False)
                    if found:
                        if not writer.done:
                            _watch(writer, name, task)
                        return value
            if name in side:
                return side[name]
            return fallback[name]

        return resolve

    def _body_resolver(self, name: str) -> Any:
        body_ns = self.body.ns
        segment = body_ns.store_segment.get(name, -1)
        for position in range(len(self.invokes), 0, -1):
            if position <= segment:
                break
            if name not in self.stores[position]:
                continue
            found, value = self._wait_for(self.body, self.invokes[position - 1], name, until_done=True)
            if found:
                return value
        if name in body_ns.side:
            return body_ns.side[name]
        return self.globals[name]

    def _wait_for(self, reader: "Task", writer: "Task", name: str, until_done: bool) -> tuple[bool, Any]:
        """Wait until ``writer`` assigned ``name`` (or, with ``until_done``, ended)."""
        ns = writer.ns
        waited = False
        if until_done:
            if not writer.done:
                waited = True
                self.interleaver.block(reader, lambda: writer.done, lambda: self.deadlock_error(reader))
        elif not _contains(ns, name) and not writer.done:
            waited = True
            self.interleaver.block(reader, lambda: _contains(ns, name) or writer.done, lambda: self.deadlock_error(reader))
        if waited:
            # Remembered for messages: values the reader asks for later may
            # already be gone by the time `name` was assigned.
            reader.waited_for = (
                f"Before that line this invoke waited for `{name}` from {writer.label}, which assigned it "
                f"only after the forward pass had moved on: in {writer.label}, assign `{name}` (or the "
                "value you need from it) right after the module that produces it."
            )
        if _contains(ns, name):
            return True, _getitem(ns, name)
        return False, None

    # -- barriers ------------------------------------------------------------------
    def synchronise(self, participants: list["Task"]) -> None:
        """``participants`` all stand at one barrier: pin each one's reads from
        an earlier participant to the values assigned so far."""
        involved = {self.position_of[t.index] for t in participants if t.index in self.position_of}
        for position in sorted(involved):
            cross_segments, pins = self.readers[position]
            reader = self.invokes[position - 1]
            for name, segment in cross_segments.items():
                writer_position = self._current_writer(position, name, segment)
                if writer_position not in involved:
                    continue
                writer = self.invokes[writer_position - 1]
                ns = writer.ns
                if _contains(ns, name):
                    pins[name] = _getitem(ns, name)
                    if type(ns) is WatchedNamespace:
                        readers = ns.watch.get(name)
                        if readers:
                            readers.pop(reader.index, None)  # read before: the same value, now settled
                else:
                    pins.pop(name, None)

    def _current_writer(self, position: int, name: str, segment: int) -> int | None:
        """The invoke a read of ``name`` at ``position`` would take it from now
        (the resolver's choice, without waiting)."""
        for writer_position in range(position - 1, 0, -1):
            if name not in self.stores[writer_position]:
                continue
            if writer_position <= segment:
                return None
            writer = self.invokes[writer_position - 1]
            if _contains(writer.ns, name) or not writer.done:
                return writer_position
        return None

    # -- the end of the trace ---------------------------------------------------
    def final_values(self, names: set[str]) -> dict[str, Any]:
        """For each name, the value of its last assignment in program order."""
        body_ns = self.body.ns
        traced = isinstance(body_ns, TracedNamespace)
        out: dict[str, Any] = {}
        for name in names:
            best = 0
            for position in range(len(self.invokes), 0, -1):
                if name in self.stores[position] and _contains(self.invokes[position - 1].ns, name):
                    best = position
                    break
            body_segment = body_ns.store_segment.get(name) if traced else None
            if best and (body_segment is None or best > body_segment):
                out[name] = _getitem(self.invokes[best - 1].ns, name)
            elif body_segment is not None:
                if _contains(body_ns, name):
                    out[name] = _getitem(body_ns, name)
                elif name in body_ns.side:
                    out[name] = body_ns.side[name]
        return out

    def release(self) -> None:
        """After the trace: namespaces (kept by functions the body defined) go
        back to plain ones, and the barrier pins are dropped."""
        for task in self.invokes:
            ns = task.ns
            if type(ns) is WatchedNamespace:
                ns.__class__ = BodyNamespace
                ns.watch = None
        for _, pins in self.readers.values():
            pins.clear()

    def deadlock_error(self, task: "Task") -> CrossInvokeError:
        return CrossInvokeError(
            f"{task.label} waited for a name assigned by another invoke that could not be "
            "assigned in the same forward pass. Values flow forward only: an invoke can use "
            "what an earlier invoke computed at the same or an earlier module."
        )


def _watch(writer: "Task", name: str, reader: "Task") -> None:
    """Remember that ``reader`` read ``name`` from ``writer``, which still runs."""
    ns = writer.ns
    if type(ns) is not WatchedNamespace:
        ns.__class__ = WatchedNamespace  # same layout (see BodyNamespace.__slots__)
        ns.watch = {}
    readers = ns.watch.get(name)
    if readers is None:
        readers = ns.watch[name] = {}
    if reader.index not in readers:
        frame = user_frame(sys._getframe(1))
        filename, lineno = (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("<trace>", None)
        readers[reader.index] = (reader.label, writer.label, filename, lineno)
