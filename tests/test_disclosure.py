"""Nothing the API answers names a path on the server, its user or its host.

Every public endpoint of the session's shared server (``tests/test_server.py``:
the random GPT-2 and the cut SmolLM2, each served from a folder under the
test run's temporary directory) is read whole — model listings, configs,
tokenizer files, health, usage, request status, events, results, errors of
each kind, the OpenAPI documents — and searched for the server's folders,
for any absolute path, and for the user and host names.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import sys
import urllib.parse

import pytest

import seethrough
from seethrough.remote import wire
from seethrough.remote.server.disclosure import Disclosure
from test_server import ALICE, CONTENT_TYPE, call, follow, make_request, packed, post, server  # noqa: F401

pytestmark = [pytest.mark.timeout(300)]

ABSOLUTE = re.compile(r"(?<![\w:/.<>#-])/(?!v1/|docs|openapi|redoc)[\w.-]+/[\w.-]+")


def server_paths(*folders) -> list[str]:
    package = os.path.dirname(os.path.dirname(os.path.abspath(seethrough.__file__)))
    paths = {sys.prefix, os.path.expanduser("~"), package, os.getcwd(), *map(str, folders)}
    paths |= {os.path.realpath(path) for path in paths}
    return sorted(path for path in paths if len(path) > 1)


def names() -> list[str]:
    return sorted({getpass.getuser(), socket.gethostname().split(".")[0]} - {"", "localhost"})


def check(text: str, where: str, paths: list[str], vocabulary: bool = False) -> None:
    for path in paths:
        assert path not in text, f"{where} names the server path {path!r}"
    if vocabulary:  # tokenizer files: the vocabulary holds any word and many slashes as tokens
        return
    found = ABSOLUTE.findall(text)
    assert not found, f"{where} holds absolute paths: {found[:5]}"
    for name in names():
        assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{where} names {name!r}"


def answers(server, gpt2_dir, smollm2_small_dir) -> dict[str, str]:
    """Each public endpoint's whole answer (text), by what was asked."""
    got: dict[str, str] = {}
    for path in ("/v1/health", "/openapi.json", "/docs", "/redoc"):
        got[path] = call(server, "GET", path, key=None).body.decode()
    for path in ("/v1/models", "/v1/models/gpt2", "/v1/models/smollm2", "/v1/usage",
                 "/v1/models/" + urllib.parse.quote(str(gpt2_dir), safe=""), "/v1/models/nothing-like-it",
                 "/v1/models/" + urllib.parse.quote(str(smollm2_small_dir / "missing"), safe=""),
                 "/v1/requests/no-such-id", "/v1/requests/no-such-id/result"):
        got[path] = call(server, "GET", path).body.decode()
    for bad, reply in {
        "no key": call(server, "GET", "/v1/models", key=None),
        "unknown key": call(server, "GET", "/v1/models", key="mallory"),
        "wrong content type": post(server, b"{}", content_type="application/json"),
        "not a frame": post(server, b"garbage"),
        "unknown model": post(server, packed(make_request(model="nothing-like-it"))),

        "refused body": post(server, packed(make_request("import os\nprint(os.getcwd())\n"))),
    }.items():
        got[bad] = reply.body.decode()
    bodies = {
        "good": "h0 = model.transformer.h[0].output.save()\nprint('hello')\n",
        "library error": "model.transformer.wte(torch.ones(2, 3)).save()\n",
        "shape error": "x = (model.transformer.h[0].output[0] @ torch.ones(5, 5)).save()\n",
        "module path error": "x = model.transformer.nope.output.save()\n",
    }
    for what, body in bodies.items():
        reply = post(server, packed(make_request(body, modules={"torch": "torch"})))
        assert reply.status == 202, (what, reply.body)
        job_id = reply.json()["id"]
        outcome = follow(server, job_id)
        got[f"{what}: events"] = repr(outcome.events)
        got[f"{what}: result"] = repr(outcome.answer)
        got[f"{what}: status"] = call(server, "GET", f"/v1/requests/{job_id}").body.decode()
        got[f"{what}: delete"] = call(server, "DELETE", f"/v1/requests/{job_id}").body.decode()
    return got


def test_no_answer_names_a_server_path_or_the_user_or_host(server, gpt2_dir, smollm2_small_dir):
    paths = server_paths(gpt2_dir, smollm2_small_dir, gpt2_dir.parent)
    got = answers(server, gpt2_dir, smollm2_small_dir)
    assert "mat1 and mat2" in got["shape error: result"] 
    for where, text in got.items():
        check(text, where, paths)
    for name in ("gpt2", "smollm2"):
        reply = call(server, "GET", f"/v1/models/{name}/tokenizer")
        assert reply.status == 200
        check(reply.body.decode(), f"{name} tokenizer", paths, vocabulary=True)


def test_configs_name_the_model_by_its_public_name(server):
    for entry in call(server, "GET", "/v1/models").json():
        assert entry["config"]["_name_or_path"] in entry["aliases"]
    files = call(server, "GET", "/v1/models/gpt2/tokenizer").json()["files"]
    assert files and "vocab.json" in files or "tokenizer.json" in files


def test_the_scrubber_replaces_paths_and_names_and_nothing_else():
    scrub = Disclosure({"/srv/models/gpt2", "/opt/py"}, {"box7", "alice"})
    text = ('File "/opt/py/lib/torch/nn.py", line 3: no file /srv/models/gpt2/config.json on box7 for alice; '
            "/srv/models/gpt2x stays, so do alicex and /opt/pyramid")
    assert scrub.scrub(text) == ('File "<server>", line 3: no file <server> on <server> for <server>; '
                                 "/srv/models/gpt2x stays, so do alicex and /opt/pyramid")
    assert scrub.scrub("alice", names=False) == "alice"
    assert scrub.scrub("alice.errors.Error from box7.") == "alice.errors.Error from <server>."
    assert scrub.scrub("/opt/py/me.py: alice in /opt/py/x", keep=("/opt/py/me.py",)) == "/opt/py/me.py: <server> in <server>"
    assert scrub.json({"_name_or_path": "/srv/models/gpt2", "a": ["/opt/py"]}, "gpt2") == {
        "_name_or_path": "gpt2", "a": ["<server>"]}


def test_a_wire_result_of_an_error_is_scrubbed_too(tmp_path):
    from seethrough.remote.server.jobs import JobStore

    store = JobStore(60, 10, 1000, spool_dir=str(tmp_path))
    store.scrub = Disclosure({"/srv/models"}, {"box7"}).scrub
    job = store.create("k", "gpt2", "/srv/models/mine.py", b"x")
    error = {"type": "OSError", "message": "cannot open /srv/models/gpt2/x on box7", "filename": "/srv/models/mine.py",
             "code": "box7 = 1", "module": "box7.errors", "traceback": 'File "/srv/models/mine.py", line 1\n  box7 = 1\n'}
    store.finish(job, wire.pack({"error": error}, max_bytes=1 << 20), error)
    assert job.error["message"] == "cannot open <server> on <server>"
    assert job.error["filename"] == "/srv/models/mine.py"  # the caller's own file, as it sent it
    assert job.error["code"] == "box7 = 1" and job.error["module"] == "box7.errors"  # the caller's code, a module
    assert job.error["traceback"] == error["traceback"]
    assert wire.unpack(job.result, max_bytes=1 << 20)["error"]["message"] == "cannot open <server> on <server>"
