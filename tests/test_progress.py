"""What a client shows while a long remote request runs, on the shared real server.

A request that loops is cancelled from another thread after a few seconds;
the client's progress display (stderr, captured: not a terminal) must have
said ``running`` with the seconds so far meanwhile.  A generation whose
steps each take a while reports its step count as ``status`` events.
"""

from __future__ import annotations

import threading

import pytest

import torch

from seethrough import CONFIG, LanguageModel
from seethrough.remote.client.connection import RemoteClient, RemoteError, RemoteJob
from test_cancel import ENDLESS, started
from test_server import ALICE, make_request, packed, post, server  # noqa: F401

pytestmark = [pytest.mark.timeout(300)]



@pytest.fixture
def progress_on():
    before = CONFIG.APP.PROGRESS
    CONFIG.APP.PROGRESS = True
    yield
    CONFIG.APP.PROGRESS = before


def test_a_long_request_shows_running_with_its_time(server, progress_on, capsys):
    job_id = post(server, packed(make_request(ENDLESS))).json()["id"]
    job = RemoteJob(RemoteClient(server.url, ALICE), job_id)
    started(server, job_id)
    stopper = threading.Timer(2.5, job.cancel)
    stopper.start()
    with pytest.raises(RemoteError, match="cancelled"):
        job.wait()
    stopper.join()
    err = capsys.readouterr().err
    assert "seethrough remote: running (" in err, err
    seconds = [int(line.rsplit("(", 1)[1].split()[0]) for line in err.splitlines() if "running (" in line]
    assert seconds and seconds[0] >= 1


def test_a_generation_shows_its_steps(server, gpt2_dir, progress_on, capsys):
    model = LanguageModel(str(gpt2_dir))
    object.__setattr__(model, "_remote_name", "gpt2")  # the name the server serves this folder under
    with model.generate("Once upon a time", max_new_tokens=40, do_sample=False, remote=True, host=server.url,
                        api_key=ALICE) as tracer:
        for step in tracer.iter[:]:
            # Work enough that the generation runs for seconds even on an idle fast machine
            # (steps are reported every half second, the display starts after one).
            for i in range(60):
                x = torch.ones(320, 320) @ torch.ones(320, 320)
        tokens = tracer.result.save()
    assert tokens.shape[-1] > 40
    err = capsys.readouterr().err
    steps = [int(line.split("step ")[1].split()[0]) for line in err.splitlines() if "running, step " in line]
    assert steps and 1 <= steps[0] <= 41, err
