"""The ``seethrough`` command line.

.. code-block:: console

    $ seethrough demo                      # the tour on SmolLM2-135M-Instruct (offline)
    $ seethrough demo --layers 4 --quiet   # a quick run on the first 4 layers
    $ python -m seethrough demo --png out.png
    $ seethrough serve --model gpt2=/path/to/gpt2 --port 8470 --api-keys keys.txt

Each subcommand is one ``_add_<name>(subparsers)`` function that adds its
parser and sets ``handler`` (a function of the parsed arguments returning an
exit code); adding a command (e.g. ``serve``) means writing one such function
and listing it in :data:`COMMANDS`.  Heavy imports happen inside handlers, so
``seethrough --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ._version import __version__


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the interpretability tour (activations, logit lens, patching, steering)",
        description="Activation statistics, a logit lens, activation patching (with a PNG heatmap) and a "
        "steering vector, printed as tables, on SmolLM2-135M-Instruct or the model you name.",
    )
    parser.add_argument("--model", metavar="PATH_OR_ID", default=None,
                        help="a model folder or repo id (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--layers", metavar="N", type=_positive, default=None,
                        help="keep only the first N decoder layers (quick runs)")
    parser.add_argument("--png", metavar="PATH", default="seethrough-demo-patching.png",
                        help="where to write the patching heatmap (default: %(default)s)")
    parser.add_argument("--max-new-tokens", metavar="N", type=_positive, default=24,
                        help="tokens to generate before and after steering (default: %(default)s)")
    parser.add_argument("--last-position-only", action="store_true",
                        help="patch only the last token (faster; the heatmap shows layers x targets)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no explanations")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .interp.demo import DemoOptions, run_demo

    options = DemoOptions(
        model=args.model, layers=args.layers, png=args.png, max_new_tokens=args.max_new_tokens,
        quiet=args.quiet, last_position_only=args.last_position_only,
    )
    run_demo(options)
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    # Listed for `seethrough --help`; `main` hands `serve ...` to the server's
    # own parser (seethrough.remote.server.settings) before parsing here.
    subparsers.add_parser(
        "serve",
        help="run a seethrough server hosting models for remote=True traces (see `seethrough serve --help`)",
        add_help=False,
    )


# One entry per subcommand.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    """The ``seethrough`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="seethrough",
        description="seethrough: transparent access to the internals of PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"seethrough {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``seethrough`` and ``python -m seethrough``; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["serve"]:
        return _serve(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    from .errors import SeethroughError

    try:
        return int(handler(args) or 0)
    except SeethroughError as error:  # a clear message is enough; no traceback
        print(f"seethrough {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("seethrough: interrupted", file=sys.stderr)
        return 130


# What the `server` extra installs, by import name.
_SERVER_EXTRA = frozenset({"fastapi", "starlette", "uvicorn", "h11", "msgpack", "httpx", "anyio"})


def _serve(arguments: list[str]) -> int:
    """``seethrough serve``: the server parses its own options (``seethrough serve --help``)."""
    try:
        from .remote.server import main as serve_main

        return serve_main(arguments, prog="seethrough serve")
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _SERVER_EXTRA:
            raise
        print(f"seethrough serve: the server needs the `server` extra ({error.name} is not installed): "
              "pip install 'seethrough[server]'", file=sys.stderr)
        return 1
