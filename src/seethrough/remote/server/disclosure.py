"""Keep the server's own paths, user and host names out of what the API answers.

A worker describes its model with whatever transformers records — a
config's ``_name_or_path`` is the folder the weights came from, a
tokenizer's ``name_or_path`` likewise — and an error raised inside a library
names the file it was raised in.  None of that is the caller's business.
:class:`Disclosure` knows the server's paths (model folders, the Python
installation and its site-packages, the seethrough sources, the home and
working folders, the spool, the Hugging Face cache) and its user and host
names, and replaces them:

* a path (or any path under it) by ``<server>``;
* the user and host names, as whole words (not part of a dotted name such
  as a module's), by ``<server>`` — in model descriptions, refusals and error
  messages; not in printed lines, tracebacks or a request's own code, which
  are the caller's words, nor in tokenizer files, whose vocabularies hold
  those words as tokens;
* a model's ``_name_or_path`` / ``name_or_path`` by its public name.

The file name a request was sent from (the client's own path) stays as it
is in that request's errors.

The API process applies it to model descriptions and tokenizer files once
(at their first read), and to every error and printed line as it arrives.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["Disclosure", "PLACEHOLDER"]

PLACEHOLDER = "<server>"
_NAME_KEYS = ("_name_or_path", "name_or_path")
_PATH_END = r"(?=[/\\\s'\"),:;\]}>]|$)"  # a path ends at a separator or a delimiter


def _user_names() -> set[str]:
    names = set()
    for read in (getpass.getuser, lambda: os.environ.get("USER", ""), lambda: Path.home().name):
        try:
            names.add(read())
        except (OSError, KeyError, RuntimeError):
            continue
    return {name for name in names if name}


def _host_names() -> set[str]:
    names = set()
    for read in (socket.gethostname, socket.getfqdn):
        try:
            names.add(read())
        except OSError:
            continue
    return {part for name in names if name and name != "localhost" for part in (name, name.split(".")[0])}


def _server_paths(extra: list[str | os.PathLike]) -> set[str]:

    package = Path(__file__).resolve().parents[2]  # the seethrough package (this is seethrough/remote/server/)
    candidates: list[Any] = [*extra, sys.prefix, sys.base_prefix, sys.exec_prefix, package.parent,
                             package.parent.parent, os.getcwd(), Path.home(),
                             os.environ.get("HF_HOME", ""), os.environ.get("SEETHROUGH_CACHE", "")]
    candidates += [entry for entry in sys.path if entry]
    paths = set()
    for candidate in candidates:
        text = os.fspath(candidate) if candidate else ""
        if not text or not os.path.isabs(text):
            continue
        for form in (text, os.path.abspath(text), os.path.realpath(text)):
            form = form.rstrip("/\\")
            if len(form) > 1 and form not in (tempfile.gettempdir(),):
                paths.add(form)
    return paths


class Disclosure:
    """Replaces the server's paths and names in text and JSON (see the module docs)."""

    def __init__(self, paths: set[str], names: set[str]) -> None:
        self.paths = sorted(paths, key=len, reverse=True)
        self.names = sorted(names, key=len, reverse=True)
        self._paths = (re.compile(r"(?<![\w.\-])(?:" + "|".join(re.escape(path) for path in self.paths) + ")"
                                  + r"(?:[/\\][^\s'\"),:;\]}>]*)?" + _PATH_END) if self.paths else None)
        self._names = (re.compile(r"(?<![\w.\-])(?:" + "|".join(re.escape(name) for name in self.names) + r")(?![\w\-]|\.\w)")
                       if self.names else None)

    @classmethod
    def of_server(cls, settings: Any, folders: list[str], spool: Path) -> "Disclosure":
        """The paths and names of this server: its models' folders, spool and installation."""
        sources = [spec.source for spec in settings.models if os.path.isabs(spec.source) or os.path.isdir(spec.source)]
        extra: list[Any] = [*sources, *folders, spool, settings.spool_dir or ""]
        extra += [os.path.dirname(path) for path in (*sources, *folders)]  # the folder the models are kept in
        return cls(_server_paths(extra), _user_names() | _host_names())

    def scrub(self, text: str, names: bool = True, keep: tuple[str, ...] = ()) -> str:
        """``text`` with server paths (and, with ``names``, the user and host names) replaced;
        the strings in ``keep`` stay (the caller's own file name, which it sent)."""
        keep = tuple(item for item in keep if item)
        if keep:
            parts = re.split("(" + "|".join(re.escape(item) for item in keep) + ")", text)
            return "".join(part if part in keep else self.scrub(part, names) for part in parts)
        if self._paths is not None:
            text = self._paths.sub(PLACEHOLDER, text)
        if names and self._names is not None:
            text = self._names.sub(PLACEHOLDER, text)
        return text

    def json(self, value: Any, public_name: str, names: bool = True) -> Any:
        """``value`` (JSON data) with every string scrubbed and name fields set to ``public_name``."""
        if isinstance(value, str):
            return self.scrub(value, names)
        if isinstance(value, dict):
            return {key: public_name if key in _NAME_KEYS and isinstance(item, str) else
                    self.json(item, public_name, names) for key, item in value.items()}
        if isinstance(value, list):
            return [self.json(item, public_name, names) for item in value]
        return value

    def model(self, info: dict, public_name: str) -> dict:
        """A worker's model description (``/v1/models``), without the tokenizer."""
        return self.json(info, public_name)

    def tokenizer(self, files: dict, public_name: str) -> dict:
        """Tokenizer files: JSON ones with their name fields set and paths scrubbed, others'
        paths scrubbed (names stay: a vocabulary holds them as tokens)."""
        texts = {}
        for relative, text in (files.get("files") or {}).items():
            try:
                data = json.loads(text)
            except ValueError:
                texts[relative] = self.scrub(str(text), names=False)
                continue
            clean = self.json(data, public_name, names=False)
            texts[relative] = text if clean == data else json.dumps(clean, ensure_ascii=False, indent=2)
        return {"files": texts, "binary_files": dict(files.get("binary_files") or {})}
