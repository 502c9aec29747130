"""Remote execution: run a trace body on a seethrough server (``remote=True``).

The package is split by where the code runs:

* ``seethrough.remote`` (this folder's modules) — what client and server both
  speak: :mod:`.wire` (the wire format: msgpack structure + one safetensors
  blob, zlib-compressed, never pickle; size caps and strict validation),
  :mod:`.portable` (the one statement of which values may travel, and how
  deep they may nest), :mod:`.protocol` (a request's shape, option
  allowlists, error answers, the declared ``LOCAL_SERVER`` entry point) and
  :mod:`.refusal` (``SandboxViolation``, the error a refused body gets);
* :mod:`seethrough.remote.client` — the user's side: HTTP client, request
  building, registered modules, and ``remote=True`` / ``remote="local"`` on
  leaving a block;
* :mod:`seethrough.remote.server` — the server: the HTTP front door, workers,
  the sandbox (AST allowlist, restricted namespace, reach guard), execution,
  and :mod:`seethrough.remote.server.local` (``remote="local"``: the server's
  steps in this process).

Imports point down only: the server may import the client and the common
modules, the client only the common ones, the common ones neither
(``tests/test_layers.py``).  This package imports nothing on its own.
"""
