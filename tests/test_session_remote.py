"""A session's unsaved values, locally and on a real server: usable by the
session's later traces without ``.save()`` (nnsight's promise), not leaving
the session; local and remote give bitwise-equal results, and the patched
logits equal a plain HuggingFace forward with a raw hook doing the patch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures.threads import one_thread  # noqa: F401 - autouse: as the server's workers, bitwise-equal values
from seethrough import NotSavedError
from test_remote import assert_same, on, served  # noqa: F401 - shared helpers
from test_server import server  # noqa: F401 - the shared server fixtures

pytestmark = [pytest.mark.timeout(300)]


def session_without_save(model, options):
    with model.session(**options):
        with model.trace("The cat sat on the"):
            donor = model.layers[0].output[:, -1]  # no .save(): used by the next trace only
        with model.trace("A dog ran to the"):
            model.layers[0].output[:, -1] = donor
            patched = model.output.logits[:, -1].save()
    return donor, patched


def test_unsaved_session_values_flow_locally_and_remotely(server, gpt2_dir):
    model = served(gpt2_dir, "gpt2")
    local_donor, local = session_without_save(model, {})
    remote_donor, remote = session_without_save(model, on(server))
    assert_same(local, remote, "patched")
    for donor in (local_donor, remote_donor):
        with pytest.raises(NotSavedError):
            donor.sum()

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    with torch.no_grad():
        seen = {}

        def record(module, args, output):
            seen["h"] = output[:, -1].clone()

        handle = hf.transformer.h[0].register_forward_hook(record)
        hf(**tokenizer("The cat sat on the", return_tensors="pt"))
        handle.remove()

        def patch(module, args, output):
            output = output.clone()
            output[:, -1] = seen["h"]
            return output

        handle = hf.transformer.h[0].register_forward_hook(patch)
        ref = hf(**tokenizer("A dog ran to the", return_tensors="pt")).logits[:, -1]
        handle.remove()
    assert torch.allclose(local, ref, atol=1e-5)
