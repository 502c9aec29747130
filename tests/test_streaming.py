"""``model.generate(..., streamer=...)`` and ``model.generator.streamer``,
checked against plain HuggingFace ``generate`` with the same streamer (and a
raw forward hook where the body steers)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer, TextStreamer

from seethrough import LanguageModel
from seethrough.errors import LanguageModelError, NotInTraceError

from fixtures.models import hf_generate

PROMPT = "The capital of France is"


class Recorder(BaseStreamer):
    """A user's streamer: keeps every call."""

    def __init__(self) -> None:
        self.puts: list[list] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.tolist())

    def end(self) -> None:
        self.ends += 1


@pytest.fixture(scope="module")
def smol(smollm2_small):
    hf, tokenizer = smollm2_small
    return LanguageModel(hf, tokenizer=tokenizer), hf, tokenizer


def test_a_users_streamer_gets_what_plain_generate_gives_it_while_the_body_steers(smol):
    model, hf, tokenizer = smol
    steer = torch.full((576,), 2.0)
    mine = Recorder()
    with torch.no_grad(), model.generate(PROMPT, max_new_tokens=4, streamer=mine) as tracer:
        for step in tracer.iter[:]:
            model.model.layers[1].output[:, -1] += steer

    def hook(module, args, output):
        output[:, -1] += steer

    reference = Recorder()
    expected = hf_generate(hf, tokenizer, [PROMPT], hook=hook, max_new_tokens=4, streamer=reference)
    plain = hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=4)
    assert torch.equal(tracer.result, expected) and not torch.equal(expected, plain)
    assert mine.puts == reference.puts and len(mine.puts) == 5
    assert mine.ends == reference.ends == 1


def test_a_text_streamer_prints_what_plain_generate_prints(smol, capsys):
    model, hf, tokenizer = smol
    with torch.no_grad(), model.generate(PROMPT, max_new_tokens=5, streamer=TextStreamer(tokenizer)) as tracer:
        for step in tracer.iter[:]:
            logits = model.lm_head.output
    ours = capsys.readouterr().out
    hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=5, streamer=TextStreamer(tokenizer))
    theirs = capsys.readouterr().out
    assert ours == theirs and ours.startswith(PROMPT)


def test_generator_streamer_output_is_what_generate_streamed_at_each_step(smol):
    # As nnsight 0.8.1: at step i, `generate`'s streamer call number i (the prompt
    # ids at step 0, then the token each step chose), the invoke's rows.
    model, hf, tokenizer = smol
    prompts = [PROMPT, "Hello, my name is"]
    with torch.no_grad(), model.generate(max_new_tokens=3) as tracer:
        seen = []
        for prompt in prompts:
            with tracer.invoke(prompt):
                got = list().save()
                for step in tracer.iter[:]:
                    got.append(model.generator.streamer.output)
                seen.append(got)
        first = model.generator.streamer  # repr works anywhere
    reference = Recorder()
    expected = hf_generate(hf, tokenizer, prompts, max_new_tokens=3, streamer=reference)
    assert torch.equal(tracer.result, expected)
    assert len(reference.puts) == 4  # the prompt, then 3 tokens
    for row, got in enumerate(seen):
        assert len(got) == 3  # one per step (the last token is in tracer.result)
        assert got[0].tolist() == [reference.puts[0][row]]
        assert [g.tolist() for g in got[1:]] == [[reference.puts[i][row]] for i in (1, 2)]
    assert "streamer" in repr(first)


def test_generator_streamer_misuse_is_explained(smol):
    model, hf, tokenizer = smol
    with pytest.raises(NotInTraceError, match="outside a trace"):
        model.generator.streamer.output
    with pytest.raises(LanguageModelError, match="streamed nothing"):
        with torch.no_grad(), model.trace(PROMPT):
            model.generator.streamer.output
    with pytest.raises(LanguageModelError, match="beam search"):
        with torch.no_grad(), model.generate(PROMPT, max_new_tokens=2, num_beams=2, do_sample=False):
            model.generator.streamer.output
    with torch.no_grad(), model.generate(PROMPT, max_new_tokens=2, num_beams=2, do_sample=False) as tracer:
        pass  # beam search runs: no streamer is added
    assert torch.equal(tracer.result, hf_generate(hf, tokenizer, [PROMPT], max_new_tokens=2, num_beams=2))


# -- remote: the same body on a server ---------------------------------------------------------

from test_server import ALICE, server  # noqa: E402,F401 - the shared server fixtures
from fixtures.threads import single_thread  # noqa: E402


def _streamer_body(model, options):
    with model.generate(PROMPT, max_new_tokens=3, do_sample=False, **options) as tracer:
        streamed = list().save()
        for step in tracer.iter[:]:
            model.model.layers[1].output[:, -1] += 1.0
            streamed.append(model.generator.streamer.output)
    return tracer.result, streamed


@pytest.mark.timeout(300)
def test_generator_streamer_remotely_equals_local(server, smollm2_small_dir):
    with single_thread():  # the server's workers run with one thread: bitwise-equal values
        model = LanguageModel(str(smollm2_small_dir))
        object.__setattr__(model, "_remote_name", "smollm2")
        local = _streamer_body(model, {})
        remote = _streamer_body(model, {"remote": True, "host": server.url, "api_key": ALICE})
    assert torch.equal(remote[0], local[0])
    assert len(local[1]) == len(remote[1]) == 3
    for a, b in zip(local[1], remote[1]):
        assert torch.equal(a, b)
