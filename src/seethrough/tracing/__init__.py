"""Tracing: capture a ``with`` body, run it against the model, hand values back.

The public pieces are re-exported from :mod:`seethrough`; the modules here
are the implementation.  They form a stack, listed here from the top down:
each module imports only modules listed below it (also for type hints, also
inside functions), and information flows down through arguments and return
values.  ``tests/test_layers.py`` reads this list and holds the package to it.

* :mod:`.tracer` — ``Tracer`` and ``Invoker``, the objects users hold;
* :mod:`.operations` — ``.source``: a forward's operations, instrumented
  for one run and reported to its interleaver as events;
* :mod:`.run` — one run of a body against one model call (the one
  mechanism every kind of trace uses), owner of the run's state;
* :mod:`.namespace` — where body code runs, and name flow between invokes;
* :mod:`.barrier` — ``tracer.barrier(n)``, a point where n invokes meet;
* :mod:`.backward` — ``with loss.backward():``, gradients read in a body;
* :mod:`.interleaver` — the scheduler: hooks and greenlets that interleave
  bodies and the forward pass, serving each body the values it asks for;
* :mod:`.takeover` — stop Python from running a ``with`` body, write results back;
* :mod:`.cache` — ``tracer.cache(...)``, module values recorded in bulk;
* :mod:`.saving` — ``.save()`` and what comes back after a trace;
* :mod:`.tasks` — a body taking part in a trace (``Task``), a value reached
  (``Event``), and the exceptions that end a trace, forward or loop early;
* :mod:`.capture` — find and compile a ``with`` body from its source;
* :mod:`.patches` — patches of torch that exist only while traces run;
* :mod:`.stacks` — where the greenlets' C stacks live: one hub per thread
  runs every forward, so a pooled body greenlet never resumes at a depth
  torch's error backtraces could walk past;
* :mod:`.hooks` — which modules to hook, and hooks added and removed cheaply;
* :mod:`.values` — narrowing values to an invoke's rows, splicing edits back;
* :mod:`.messages` — why a value a body asked for never came, for the user;
* :mod:`.save_reach` — whether a body may reach code calling ``Tensor.save``;
* :mod:`.rewrite` — name a function's call sites and compile a copy that reports them;
* :mod:`.prefetch` — runs of plain saves, compiled to one request whose values
  are recorded at the hooks without switching into the body;
* :mod:`.runtime` — the running task and traces of this thread, and ``save``;
* :mod:`.contract` — what tracing needs from envoys and model wrappers
  (protocols; this package imports neither);
* :mod:`.sentinels` — ``MISSING``, the one "no value" marker.
"""
