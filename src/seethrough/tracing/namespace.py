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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CrossInvokeError

if TYPE_CHECKING:
    from .capture import CapturedBlock
    from .interleaver import Interleaver, Task

_contains = dict.__contains__
_getitem = dict.__getitem__


class BodyNamespace(dict):
    """Globals-and-locals of a running body; misses fall back to the caller's
    globals, or to a resolver that knows about other invokes."""

    __slots__ = ("fallback", "resolver")

    def __init__(self, seed: dict, fallback: dict) -> None:
        super().__init__(seed)
        self.fallback = fallback
        self.resolver: Any = None

    def __missing__(self, name: str) -> Any:
        resolver = self.resolver
        if resolver is not None:
            return resolver(name)
        return self.fallback[name]

    def __repr__(self) -> str:  # a namespace can be huge; keep debugger views short
        return f"<trace namespace with {len(self)} names>"


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
        task.ns.resolver = self._invoke_resolver(task, position, side, cross_segments)
        body_ns = self.body.ns
        if isinstance(body_ns, TracedNamespace):
            # Names this invoke may assign are, for the code after it, the invoke's.
            for name in captured.stored:
                if _contains(body_ns, name):
                    body_ns.side[name] = dict.pop(body_ns, name)
            body_ns.segment = position

    # -- resolvers (run inside the reading task's greenlet) ---------------------
    def _invoke_resolver(self, task: "Task", position: int, side: dict, cross_segments: dict) -> Any:
        fallback = self.globals

        def resolve(name: str) -> Any:
            segment = cross_segments.get(name)
            if segment is not None:
                for writer_position in range(position - 1, 0, -1):
                    if name not in self.stores[writer_position]:
                        continue
                    if writer_position <= segment:
                        break  # the trace body assigned it after that invoke
                    found, value = self._wait_for(task, self.invokes[writer_position - 1], name, until_done=False)
                    if found:
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
                self.interleaver.block(reader, lambda: writer.done)
        elif not _contains(ns, name) and not writer.done:
            waited = True
            self.interleaver.block(reader, lambda: _contains(ns, name) or writer.done)
        if waited:
            # Remembered for messages: values the reader asks for later may
            # already be gone by the time `name` was assigned.
            reader.waited_for = (name, writer.label)
        if _contains(ns, name):
            return True, _getitem(ns, name)
        return False, None

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

    def deadlock_error(self, task: "Task") -> CrossInvokeError:
        return CrossInvokeError(
            f"{task.label} waited for a name assigned by another invoke that could not be "
            "assigned in the same forward pass. Values flow forward only: an invoke can use "
            "what an earlier invoke computed at the same or an earlier module."
        )
