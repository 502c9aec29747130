"""The seethrough server: runs remote trace bodies next to the models it serves.

``seethrough serve --model gpt2=/models/gpt2 --api-keys keys.txt`` (or
``python -m seethrough.remote.server ...``).  Two kinds of processes:

* the **API process** (FastAPI + uvicorn; :mod:`.app`) authenticates,
  has every request checked before queueing it — in checker processes
  (:mod:`.checkers`), with :mod:`.intake`: size caps, wire decoding without
  inflating tensors, protocol and version, sandbox validation — keeps a fair
  queue per model (:mod:`.scheduler`), the jobs with their events, and their
  bodies and results spooled to disk under per-key quotas (:mod:`.jobs`), and
  one dispatcher thread per worker (:mod:`.service`) that enforces the
  wall-clock limit;
* **worker processes** (:mod:`.worker`, started by :mod:`.process` in a spawn
  context, talking over a pipe with :mod:`.framing` — never pickles): each
  loads its model once, makes its weights read-only, walls itself off from
  the host (:mod:`.isolation`) and runs one request at a time, each in a
  process forked from it (:mod:`.forking`; where fork is impossible, in
  place with a full state check, :mod:`.fingerprint`), with the same
  machinery as a local trace (:func:`.execute.execute`), streams printed
  lines back, and checks after every request that the model is unchanged
  (:mod:`.guard`).  A crash, timeout, memory exhaustion or a changed model
  fails that request only.

A body runs in the sandbox: :mod:`.sandbox` (the static AST allowlist and
the restricted namespace), :mod:`.reach` (what each kind of object gives a
body at run time), :mod:`.modules` (registered modules rebuilt from their
source).  :mod:`.local` is ``remote="local"``: these steps in the user's
process, through the one entry point the protocol declares
(``seethrough.remote.protocol.LOCAL_SERVER``).

:mod:`.settings` parses the command line; :mod:`.cli` runs it all;
:mod:`.testing` starts a server in a subprocess (tests, benchmarks).  The
server's dependencies (fastapi, uvicorn) are the ``server`` extra: importing
this package does not import them.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "seethrough serve") -> int:
    """Run ``seethrough serve`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from .cli import main as run

    return run(argv, prog=prog)
