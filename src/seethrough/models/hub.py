"""Whether the model hub can be reached, asked once and quickly.

HuggingFace's loaders retry an unreachable hub with growing pauses (about half
a minute before they give up), and then fall back to their local cache.  For
a repo id that is not a local folder, seethrough asks first — one TCP
connection with a short timeout, remembered for a minute — and, when the hub
cannot be reached (or ``HF_HUB_OFFLINE`` is set), loads with
``local_files_only=True``: a model in the local cache loads at once, any
other fails at once with a message that says why.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse

__all__ = ["hub_endpoint", "hub_reachable", "offline_loading"]

_PROBE_TIMEOUT = 3.0
_REMEMBER_SECONDS = 60.0
_last_probe: tuple[float, str, bool] | None = None


def hub_endpoint() -> str:
    """The hub's address (``HF_ENDPOINT`` or huggingface.co)."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _offline_by_setting() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = _PROBE_TIMEOUT) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds."""
    global _last_probe
    endpoint = hub_endpoint()
    now = time.monotonic()
    if _last_probe is not None and _last_probe[1] == endpoint and now - _last_probe[0] < _REMEMBER_SECONDS:
        return _last_probe[2]
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            reachable = True
    except (OSError, ValueError):
        reachable = False
    _last_probe = (now, endpoint, reachable)
    return reachable


def offline_loading(path: str) -> bool:
    """Whether ``path`` (a folder or a repo id) must load from local files only."""
    if os.path.isdir(path):
        return False
    return _offline_by_setting() or not hub_reachable()
