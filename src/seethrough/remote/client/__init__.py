"""The client: what runs on the user's machine for ``remote=True``.

* :mod:`.connection` — talk to a server over HTTP (submit, follow, fetch,
  cancel), the ``Remote*Error`` classes, :func:`job`, :func:`served_model`,
  and :func:`rebuild_error` (a server's error, raised again here);
* :mod:`.collect` — build a request from a captured block (its source, the
  values and helper functions it uses), refusing what cannot travel;
* :mod:`.registry` — modules registered to travel as source (``seethrough.register``);
* :mod:`.backend` — ``remote=True`` / ``remote="local"`` on leaving a block:
  submit (or run in-process through the protocol's declared
  ``LOCAL_SERVER`` entry point), wait, bind the values in the caller's scope.

It imports the common modules above it (``seethrough.remote.wire``,
``.protocol``, ``.refusal``, ``.portable``) and never the server
(``seethrough.remote.server``); ``tests/test_layers.py`` checks it.  The
names below are the client's documented ones, re-exported from
:mod:`.connection`.
"""

from .connection import (
    ModelNotServedError,
    RemoteAuthError,
    RemoteClient,
    RemoteConnectionError,
    RemoteError,
    RemoteJob,
    RemoteRequestError,
    ServedModel,
    job,
    rebuild_error,
    served_model,
)

__all__ = [
    "ModelNotServedError",
    "RemoteAuthError",
    "RemoteClient",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteJob",
    "RemoteRequestError",
    "ServedModel",
    "job",
    "rebuild_error",
    "served_model",
]
