"""``seethrough serve``: parse the options, load the models, run uvicorn.

:func:`main` is the whole command: it loads every model in its worker
processes first (so a model that cannot load stops the command with a clear
message before the port opens), then serves the API until interrupted, then
stops the workers.  Ctrl+C prints one line (uvicorn's own shutdown lines are
left out of the log).
"""

from __future__ import annotations

import logging
import sys

from .settings import DEFAULT_SERVED, Settings, SettingsError, _model_spec, parse_args

__all__ = ["main", "serve"]

logger = logging.getLogger("seethrough.server")

_SHUTDOWN_LINES = ("Shutting down", "Waiting for application shutdown", "Application shutdown complete",
                   "Finished server process", "Waiting for connections to close", "Waiting for background tasks")


class _QuietShutdown(logging.Filter):
    """Drops uvicorn's shutdown lines: a stopped server says ``stopped`` once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_SHUTDOWN_LINES))


def serve(settings: Settings, prog: str = "seethrough serve") -> int:
    """Run a server with ``settings`` until it is stopped; return the exit status."""
    import uvicorn

    from .app import create_app
    from .connections import ConnectionGuard, deepen_listen_queues, guarded_protocol, plan_connections
    from .process import WorkerStartError
    from .service import ServerRuntime

    if settings.api_keys is None:
        logger.warning("no --api-keys file: this server accepts requests from anyone who can reach %s:%d",
                       settings.host, settings.port)
    try:
        runtime = ServerRuntime(settings)
    except WorkerStartError as error:  # --ray: the cluster cannot be reached
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    names = ", ".join(f"{spec.name}={spec.source}" for spec in settings.models)
    if settings.models == (_model_spec(DEFAULT_SERVED),):
        logger.info("serving the bundled offline model (%s); choose models with --model NAME=PATH_OR_REPO", names)
    logger.info("loading %s ...", names)
    try:
        runtime.start()
    except WorkerStartError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    line, complete = runtime.isolation_line()
    (logger.info if complete and settings.isolation != "off" else logger.warning)("%s", line)
    try:
        limits = plan_connections(settings.max_connections, settings.max_connections_per_address,
                                  settings.header_timeout)
        logger.info("front door: at most %d connections (%d per address), request heads within %g s",
                    limits.max_connections, limits.max_per_address, limits.header_timeout)
        config = uvicorn.Config(create_app(runtime), host=settings.host, port=settings.port,
                                log_level=settings.log_level, timeout_graceful_shutdown=3, access_log=False,
                                http=guarded_protocol(ConnectionGuard(limits)), backlog=limits.backlog,
                                timeout_keep_alive=settings.keep_alive)
        logging.getLogger("uvicorn.error").addFilter(_QuietShutdown())  # after Config: it sets up uvicorn's logging

        class Server(uvicorn.Server):  # deepens the kernel's listen queue once the sockets listen
            async def startup(self, sockets: list | None = None) -> None:
                await super().startup(sockets=sockets)
                deepen_listen_queues(getattr(self, "servers", []))

        server = Server(config)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it already handled: say it in one line
            print(f"{prog}: stopped", file=sys.stderr)
            return 0
        return 0 if server.started else 1
    finally:
        runtime.stop()


def main(argv: list[str] | None = None, prog: str = "seethrough serve") -> int:
    """``seethrough serve ...`` (also ``python -m seethrough.remote.server ...``)."""
    try:
        settings = parse_args(argv, prog=prog)
    except SettingsError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(settings, prog)
    except KeyboardInterrupt:  # Ctrl+C while the models load
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
