"""``seethrough.CONFIG``: settings shared by every wrapper.

Remote execution reads its server and key from here; the environment
variables ``SEETHROUGH_HOST`` and ``SEETHROUGH_API_KEY`` provide the defaults.
``CONFIG.APP.DEBUG`` (default off; ``SEETHROUGH_DEBUG=1`` or nnsight's
``NNSIGHT_DEBUG=1`` turn it on) keeps seethrough's own frames in the
tracebacks of errors raised in a trace; off, they show only your code.
The attribute names follow nnsight's ``CONFIG`` so ported code keeps working
(``CONFIG.API.APIKEY``, ``CONFIG.API.HOST``, ``CONFIG.set_default_api_key``,
``CONFIG.APP.DEBUG``).
:func:`cache_dir` is where seethrough keeps files it makes (converted
offline models, descriptions of served models).
"""

from __future__ import annotations

import os
from pathlib import Path


DEFAULT_HOST = "http://127.0.0.1:8470"
# Environment variables that turn CONFIG.APP.DEBUG on (seethrough's, then nnsight's name).
DEBUG_VARIABLES = ("SEETHROUGH_DEBUG", "NNSIGHT_DEBUG")
_OFF = frozenset({"", "0", "false", "no", "off"})


def _env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other
    than an empty string, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(name, "").strip().lower() not in _OFF


def cache_dir() -> Path:
    """``$SEETHROUGH_CACHE`` if set, else ``~/.cache/seethrough`` (created)."""
    path = Path(os.environ.get("SEETHROUGH_CACHE") or Path.home() / ".cache" / "seethrough")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


class _ApiConfig:
    """Where remote traces go, and the key they use.

    A value set in code (``CONFIG.API.HOST = ...``) wins; until then each read
    looks at ``SEETHROUGH_HOST`` / ``SEETHROUGH_API_KEY`` as they are at that
    moment, so a notebook may set ``os.environ`` after ``import seethrough``.
    """

    def __init__(self) -> None:
        self._host: str | None = None
        self._api_key: str | None = None

    @property
    def HOST(self) -> str:  # noqa: N802 - nnsight's name
        return self._host if self._host is not None else os.environ.get("SEETHROUGH_HOST") or DEFAULT_HOST

    @HOST.setter
    def HOST(self, value: str | None) -> None:  # noqa: N802
        self._host = value

    @property
    def APIKEY(self) -> str | None:  # noqa: N802 - nnsight's name
        return self._api_key if self._api_key is not None else os.environ.get("SEETHROUGH_API_KEY") or None

    @APIKEY.setter
    def APIKEY(self, value: str | None) -> None:  # noqa: N802
        self._api_key = value

    def __repr__(self) -> str:
        key = "set" if self.APIKEY else "not set"
        return f"<API host={self.HOST!r} key {key}>"


class _AppConfig:
    """Client-side behaviour."""

    def __init__(self) -> None:
        self.REMOTE_LOGGING: bool = True  # stream `print` output of remote bodies
        self.PROGRESS: bool = True  # progress displays for slow steps
        self._debug: bool | None = None

    @property
    def DEBUG(self) -> bool:  # noqa: N802 - nnsight's name
        """Show seethrough's own frames in the tracebacks of errors raised in a
        trace (off: only your code's frames).  Read when an error is raised, so
        setting it mid-session takes effect at once.  A value set in code wins;
        until then (or after setting ``None``) ``SEETHROUGH_DEBUG`` or
        ``NNSIGHT_DEBUG`` set to anything but ``0``/``false``/``no``/``off``
        turns it on."""
        if self._debug is not None:
            return self._debug
        return any(_env_flag(name) for name in DEBUG_VARIABLES)

    @DEBUG.setter
    def DEBUG(self, value: bool | None) -> None:  # noqa: N802
        self._debug = None if value is None else bool(value)

    def __repr__(self) -> str:
        return f"<APP DEBUG={self.DEBUG} REMOTE_LOGGING={self.REMOTE_LOGGING} PROGRESS={self.PROGRESS}>"


class Config:
    """The process-wide settings object (``seethrough.CONFIG``)."""

    def __init__(self) -> None:
        self.API = _ApiConfig()
        self.APP = _AppConfig()

    def set_default_api_key(self, key: str) -> None:
        self.API.APIKEY = key

    def set_default_host(self, host: str) -> None:
        self.API.HOST = host

    def __repr__(self) -> str:
        return f"<seethrough CONFIG {self.API!r}>"


CONFIG = Config()
