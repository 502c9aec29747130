"""Remote execution: run a trace body on a seethrough server (``remote=True``).

The pieces, each in its own module so that local use imports none of them:

* ``wire``    — the wire format (msgpack structure + one safetensors blob,
  zlib-compressed, never pickle), with size caps and strict validation;
* ``sandbox`` — validation of untrusted trace bodies (an AST allowlist) and the
  restricted namespace they run in (safe builtins, read-only module proxies).

Import them explicitly (``from seethrough.remote import wire``); this package
imports nothing on its own.
"""
