"""Start a real seethrough server in a subprocess (for tests and benchmarks).

.. code-block:: python

    with ServerProcess({"gpt2": "/models/gpt2"}, api_keys=["alice"]) as server:
        model.trace("hi", remote=True, host=server.url, api_key="alice")

The server runs ``python -m seethrough.remote.server`` on a free loopback
port; :meth:`ServerProcess.start` returns once ``/v1/health`` answers (the
models are loaded by then).  On Linux the server dies with the process that
started it, so a killed test run leaves nothing behind.  :func:`shared_server`
hands out one server per set of arguments for the whole process (test modules
that want the same server share it).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "free_port", "shared_server"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A ``seethrough serve`` subprocess on a free loopback port."""

    def __init__(self, models: dict[str, str], *, api_keys: list[str] | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 180.0) -> None:
        self.models = dict(models)
        self.api_keys = list(api_keys) if api_keys is not None else None
        self.args = list(args or [])
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="seethrough-server-"))
        self.log_path = self._folder / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "seethrough.remote.server", "--host", "127.0.0.1", "--port", str(self.port)]
        for name, source in self.models.items():
            command += ["--model", f"{name}={source}"]
        if self.api_keys is not None:
            keys = self._folder / "keys.txt"
            keys.write_text("# test keys\n" + "\n".join(self.api_keys) + "\n", encoding="utf-8")
            command += ["--api-keys", str(keys)]
        return command + self.args

    def start(self) -> "ServerProcess":
        """Start the server and wait until it answers (raises RuntimeError with its log if it does not)."""
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                status, output = self.process.returncode, self.log()
                self.stop()
                raise RuntimeError(f"the server exited with status {status}:\n{output}")
            try:
                if self.health().get("status") == "ok":
                    return self
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.2)
        output = self.log()
        self.stop()
        raise RuntimeError(f"the server did not answer within {self.startup_timeout:.0f} s:\n{output}")

    def health(self) -> dict:
        return self.get_json("/v1/health")

    def get_json(self, path: str, headers: dict | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return json.loads(response.read())
        finally:
            connection.close()

    def worker_pids(self, model: str) -> list[int]:
        return [worker["pid"] for worker in self.health()["models"][model]["workers"] if worker["pid"]]

    def log(self) -> str:
        """The end of the server's output (until :meth:`stop` removes it)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-20_000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "ServerProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_SHARED: dict[str, ServerProcess] = {}


def shared_server(models: dict[str, str], *, api_keys: list[str] | None = None, args: list[str] | None = None,
                  env: dict[str, str] | None = None) -> ServerProcess:
    """One running server per distinct set of arguments, for the whole process (stopped at exit)."""
    key = json.dumps([sorted(models.items()), api_keys, args, sorted((env or {}).items())])
    server = _SHARED.get(key)
    if server is None or server.process is None or server.process.poll() is not None:
        server = ServerProcess(models, api_keys=api_keys, args=args, env=env).start()
        _SHARED[key] = server
        atexit.register(server.stop)
    return server
