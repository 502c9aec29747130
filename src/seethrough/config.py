"""``seethrough.CONFIG``: settings shared by every wrapper.

Remote execution reads its server and key from here; the environment
variables ``SEETHROUGH_HOST`` and ``SEETHROUGH_API_KEY`` provide the defaults.
The attribute names follow nnsight's ``CONFIG`` so ported code keeps working
(``CONFIG.API.APIKEY``, ``CONFIG.API.HOST``, ``CONFIG.set_default_api_key``).
"""

from __future__ import annotations

import os


class _ApiConfig:
    """Where remote traces go, and the key they use."""

    def __init__(self) -> None:
        self.HOST: str = os.environ.get("SEETHROUGH_HOST", "http://127.0.0.1:8470")
        self.APIKEY: str | None = os.environ.get("SEETHROUGH_API_KEY")

    def __repr__(self) -> str:
        key = "set" if self.APIKEY else "not set"
        return f"<API host={self.HOST!r} key {key}>"


class _AppConfig:
    """Client-side behaviour."""

    def __init__(self) -> None:
        self.REMOTE_LOGGING: bool = True  # stream `print` output of remote bodies
        self.PROGRESS: bool = True  # progress displays for slow steps


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
