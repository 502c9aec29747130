"""nnsight's ``nnsight.ndif`` path: ``register``.

``register(module)`` (a module or its name) lets a remote body use the
functions and classes of your own module: they travel with the request as
source and the server rebuilds them inside its sandbox (see
:mod:`seethrough.remote.client.registry`).  nnsight's NDIF status helpers
(``status``, ``ndif_status``, ``compare``, ...) have no counterpart: a
seethrough server lists its models at ``GET /v1/models``.
"""

from .remote.client.registry import register, unregister

__all__ = ["register", "unregister"]
