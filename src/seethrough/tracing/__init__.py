"""Tracing: capture a ``with`` body, run it against the model, hand values back.

The public pieces are re-exported from :mod:`seethrough`; the modules here
are the implementation:

* :mod:`.capture` — find and compile a ``with`` body from its source;
* :mod:`.takeover` — stop Python from running it, write results back;
* :mod:`.run` — one run of a body against one model call (the one mechanism);
* :mod:`.interleaver` — greenlets and hooks that interleave bodies and forward;
* :mod:`.stacks` — where those greenlets' C stacks live: one hub per thread
  runs every forward, so a pooled body greenlet never resumes at a depth
  torch's error backtraces could walk past;
* :mod:`.runtime` — the running task, the running traces, the task greenlet type;
* :mod:`.namespace` — where body code runs, and name flow between invokes;
* :mod:`.values` — narrowing to an invoke's rows, splicing edits;
* :mod:`.saving` — ``.save()`` and what comes back after a trace;
* :mod:`.tracer` — ``Tracer`` and ``Invoker``, the objects users hold;
* :mod:`.cache`, :mod:`.backward`, :mod:`.patches` — ``tracer.cache``,
  ``with loss.backward():``, and patches scoped to running traces.
* :mod:`.contract` — what tracing needs from envoys and model wrappers
  (protocols; this package imports neither);
* :mod:`.hooks` — which modules to hook, and hooks added and removed cheaply;
* :mod:`.sentinels` — ``MISSING``, the one "no value" marker.
"""
