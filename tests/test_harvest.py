"""model.harvest: one body over many prompts, kept values on disk.

References are independent of seethrough: raw forward hooks on the plain
HuggingFace model, each prompt run alone (no padding at all), and a
hand-written loop over the same micro-batches.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
import torch

import seethrough
from seethrough import LanguageModel
from seethrough.errors import ShapeMismatchError, SeethroughError, UsageValueError, InputTypeError

TEXTS = [
    "The Eiffel Tower is in",
    "Hello",
    "A much longer prompt about rivers, mountains and the sea, with several clauses in it",
    "One two three four five",
    "Paris",
    "The quick brown fox jumps over the lazy dog again and again",
    "Short one",
    "Cats and dogs",
    "What is the capital of Italy? It is",
    "x",
    "Seven words make a sentence right here",
    "The end",
]


@pytest.fixture(scope="module")
def lm(smollm2_small):
    hf, tok = smollm2_small
    return LanguageModel(hf, tokenizer=tok)


def alone(hf, tok, text, layer, max_length=None):
    """Reference: one prompt, no padding, raw hook on decoder layer ``layer``."""
    ids = tok(text, truncation=max_length is not None, max_length=max_length, return_tensors="pt")["input_ids"]
    seen = []
    handle = hf.model.layers[layer].register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids).logits
    finally:
        handle.remove()
    return seen[0][0], logits[0, -1], ids[0]


def folder_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("side", ["left", "right"])
def test_kept_values_equal_raw_hooks_per_prompt_alone(lm, smollm2_small, tmp_path, side):
    hf, tok = smollm2_small
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=5, window=7, padding_side=side, progress=False) as run:
        run.keep("emb", lm.model.embed_tokens.output)
        run.keep("resid2", lm.model.layers[2].output)
    store = seethrough.load(tmp_path / "s")
    assert store.complete and store.n_prompts == len(TEXTS)
    assert store.per("resid2") == "token"
    rows = store["resid2"]
    prompt, position, token = (store.index[k] for k in ("prompt", "position", "token"))
    offset = 0
    for number, text in enumerate(TEXTS):
        ref, _, ids = alone(hf, tok, text, 2)
        n = len(ids)
        got = rows[offset : offset + n]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert prompt[offset : offset + n].tolist() == [number] * n
        assert position[offset : offset + n].tolist() == list(range(n))
        assert token[offset : offset + n].tolist() == ids.tolist()
        emb = hf.model.embed_tokens(ids).detach()
        assert torch.equal(store["emb"][offset : offset + n], emb)  # embeddings: padding-free and exact
        offset += n
    assert offset == len(rows) == store.n_tokens


@pytest.mark.parametrize("side", ["left", "right"])
def test_kept_values_equal_hand_loop_bit_for_bit(lm, smollm2_small, tmp_path, side):
    """The same micro-batches (no bucketing), padded the same way, through a
    plain HF forward with a hook that drops padding: identical bits."""
    hf, tok = smollm2_small
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=4, bucket=False, padding_side=side, progress=False) as run:
        run.keep("resid1", lm.model.layers[1].output)
    got = seethrough.load(tmp_path / "s")["resid1"].tensor()
    pad = tok.pad_token_id
    expected = []
    for start in range(0, len(TEXTS), 4):
        rows = [tok(t)["input_ids"] for t in TEXTS[start : start + 4]]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), pad)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            where = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
            ids[r, where] = torch.tensor(row)
            mask[r, where] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = []
        handle = hf.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(o[mask.bool()].clone()))
        try:
            with torch.no_grad():
                kwargs = {"position_ids": position_ids} if not bool(mask.all()) else {}
                hf(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            handle.remove()
        expected.append(seen[0])
    assert torch.equal(got, torch.cat(expected))


def test_per_prompt_values_steering_and_dtype(lm, smollm2_small, tmp_path):
    hf, tok = smollm2_small
    steer = torch.randn(576, generator=torch.Generator().manual_seed(0))
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=3, dtype=torch.bfloat16, progress=False) as run:
        lm.model.layers[1].output[:] += steer
        run.keep("last_logits", lm.lm_head.output[:, -1])
    store = seethrough.load(tmp_path / "s")
    assert store.per("last_logits") == "prompt" and store["last_logits"].dtype == torch.bfloat16
    handle = hf.model.layers[1].register_forward_hook(lambda m, a, o: o + steer)
    try:
        for number, text in enumerate(TEXTS):
            _, ref, _ = alone(hf, tok, text, 0)
            torch.testing.assert_close(store["last_logits"][number].float(), ref.to(torch.bfloat16).float(), rtol=2e-2, atol=5e-2)
    finally:
        handle.remove()


def test_bucketing_keeps_input_order(lm, tmp_path):
    for name, bucket in (("a", True), ("b", False)):
        with lm.harvest(TEXTS, to=tmp_path / name, batch_size=3, bucket=bucket, progress=False) as run:
            run.keep("resid0", lm.model.layers[0].output)
    a, b = seethrough.load(tmp_path / "a"), seethrough.load(tmp_path / "b")
    assert torch.equal(a.index["prompt"].tensor(), b.index["prompt"].tensor())
    assert torch.equal(a.index["token"].tensor(), b.index["token"].tensor())
    torch.testing.assert_close(a["resid0"].tensor(), b["resid0"].tensor(), rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _nothing():
    yield


def _interrupting(items, after):
    for number, item in enumerate(items):
        if number == after:
            raise KeyboardInterrupt
        yield item


def test_interrupted_run_resumes_to_the_same_store_bit_for_bit(lm, tmp_path):
    texts = TEXTS * 2
    options = dict(batch_size="auto", max_memory="1GB", window=5, max_length=12, dtype="float16", progress=False)
    with lm.harvest(texts, to=tmp_path / "clean", **options) as run:
        run.keep("resid3", lm.model.layers[3].output)
        run.keep("last", lm.model.norm.output[:, -1])
    with pytest.raises(KeyboardInterrupt):
        with lm.harvest(_interrupting(texts, 13), to=tmp_path / "resumed", **options) as run:
            run.keep("resid3", lm.model.layers[3].output)
            run.keep("last", lm.model.norm.output[:, -1])
    partial = seethrough.load(tmp_path / "resumed")
    assert not partial.complete and partial.n_prompts == 10  # two complete shards of 5
    with lm.harvest(texts, to=tmp_path / "resumed", **options) as run:
        run.keep("resid3", lm.model.layers[3].output)
        run.keep("last", lm.model.norm.output[:, -1])
    assert run.summary["shards_resumed"] == 2 and run.summary["shards_written"] == 3
    assert run.summary["tokens"] == seethrough.load(tmp_path / "clean").n_tokens > run.summary["tokens_computed"]
    assert folder_hash(tmp_path / "resumed") == folder_hash(tmp_path / "clean")
    with lm.harvest(texts, to=tmp_path / "resumed", **options) as run:  # complete: nothing to compute
        run.keep("resid3", lm.model.layers[3].output)
        run.keep("last", lm.model.norm.output[:, -1])
    assert run.summary["shards_written"] == 0 and run.summary["tokens_computed"] == 0
    assert folder_hash(tmp_path / "resumed") == folder_hash(tmp_path / "clean")


def test_a_folder_holding_another_run_is_refused(lm, tmp_path):
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=4, progress=False) as run:
        run.keep("resid0", lm.model.layers[0].output)
    before = folder_hash(tmp_path / "s")
    with pytest.raises(seethrough.HarvestStoreError, match="different harvest.*body"):
        with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=4, progress=False) as run:
            run.keep("resid1", lm.model.layers[1].output)
    with pytest.raises(seethrough.HarvestStoreError, match="other prompts"):
        with lm.harvest(TEXTS[::-1], to=tmp_path / "s", batch_size=4, progress=False) as run:
            run.keep("resid0", lm.model.layers[0].output)
    for prompts in (TEXTS, TEXTS[:4]):  # the second call's input is a prefix of the first's
        with pytest.raises(seethrough.HarvestStoreError, match="longer input") if prompts is not TEXTS else _nothing():
            with lm.harvest(prompts, to=tmp_path / "w", batch_size=4, window=4, progress=False) as run:
                run.keep("resid0", lm.model.layers[0].output)
    assert seethrough.load(tmp_path / "w").n_prompts == len(TEXTS)
    assert folder_hash(tmp_path / "s") == before  # nothing mixed in
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(seethrough.HarvestStoreError, match="not empty"):
        with lm.harvest(TEXTS, to=tmp_path / "other", progress=False) as run:
            run.keep("resid0", lm.model.layers[0].output)
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=4, progress=False, overwrite=True) as run:
        run.keep("resid1", lm.model.layers[1].output)
    assert seethrough.load(tmp_path / "s").keys() == ["resid1"]


def test_bad_input_gets_clear_errors(lm, tmp_path):
    with pytest.raises(ShapeMismatchError, match="first dimension must be the batch"):
        with lm.harvest(TEXTS, to=tmp_path / "a", batch_size=4, progress=False) as run:
            run.keep("row0", lm.model.layers[0].output[0])
    with pytest.raises(SeethroughError, match="nonexistent"):
        with lm.harvest(TEXTS, to=tmp_path / "b", batch_size=4, progress=False) as run:
            run.keep("x", lm.model.nonexistent.output)
    with pytest.raises(UsageValueError, match="kept nothing"):
        with lm.harvest(TEXTS, to=tmp_path / "c", batch_size=4, progress=False) as run:
            h = lm.model.layers[0].output
    with pytest.raises(InputTypeError, match="list"):
        lm.harvest("one string", to=tmp_path / "d")
    with pytest.raises(UsageValueError, match="batch_size"):
        lm.harvest(TEXTS, to=tmp_path / "d", batch_size=0)
    with pytest.raises(seethrough.HarvestStoreError, match="no harvest store"):
        seethrough.load(tmp_path)


def test_token_ids_iterables_and_truncation(lm, smollm2_small, tmp_path):
    hf, tok = smollm2_small
    ids = [tok(t)["input_ids"] for t in TEXTS]
    with lm.harvest(iter(ids), to=tmp_path / "ids", batch_size=4, max_length=6, progress=False) as run:
        run.keep("resid0", lm.model.layers[0].output)
    store = seethrough.load(tmp_path / "ids")
    assert store.n_tokens == sum(min(len(r), 6) for r in ids)
    with lm.harvest(TEXTS, to=tmp_path / "text", batch_size=4, max_length=6, progress=False) as run:
        run.keep("resid0", lm.model.layers[0].output)
    assert torch.equal(store["resid0"].tensor(), seethrough.load(tmp_path / "text")["resid0"].tensor())


def test_out_of_memory_splits_the_micro_batch(lm, tmp_path):
    def too_big(rows):
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test for batches over 2 prompts)")

    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=8, progress=False) as run:
        too_big(lm.model.layers[0].output.shape[0])
        run.keep("resid0", lm.model.layers[0].output)
    assert run.summary["splits"] >= 2
    with lm.harvest(TEXTS, to=tmp_path / "ref", batch_size=1, progress=False) as run:
        run.keep("resid0", lm.model.layers[0].output)
    torch.testing.assert_close(
        seethrough.load(tmp_path / "s")["resid0"].tensor(), seethrough.load(tmp_path / "ref")["resid0"].tensor(), rtol=1e-4, atol=1e-4
    )


def test_reading_back_batches_and_dataset(lm, tmp_path):
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=4, window=4, progress=False) as run:
        run.keep("resid0", lm.model.layers[0].output)
    store = seethrough.load(tmp_path / "s")
    rows = store["resid0"]
    everything = rows.tensor()
    assert len(rows.shards) == 3 and rows.shape == everything.shape
    assert torch.equal(rows[[0, len(rows) - 1, 5]], everything[[0, len(everything) - 1, 5]])
    assert torch.equal(rows[len(rows) - 1], everything[-1])
    seen = torch.cat([b["_prompt"] * 1000 + b["_position"] for b in store.batches(["resid0"], batch_size=7, index=True)])
    keys = (store.index["prompt"].tensor() * 1000 + store.index["position"].tensor())
    assert sorted(seen.tolist()) == sorted(keys.tolist()) and seen.tolist() != keys.tolist()  # all rows, shuffled
    total = sum(len(b) for b in store.batches("resid0", batch_size=5))
    assert total == len(rows)
    dataset = store.dataset("resid0")
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
    assert torch.equal(torch.cat(list(loader)), everything)


def test_gradients_when_asked(lm, smollm2_small, tmp_path):
    hf, tok = smollm2_small
    with pytest.raises(UsageValueError, match="grad=True"):
        with lm.harvest(TEXTS[:3], to=tmp_path / "no", batch_size=3, progress=False) as run:
            h = lm.model.layers[1].output
            with lm.output.logits.sum().backward():
                run.keep("g", h.grad)
    with lm.harvest(TEXTS[:3], to=tmp_path / "g", batch_size=1, grad=True, progress=False) as run:
        h = lm.model.layers[1].output
        with lm.output.logits[:, -1].sum().backward():
            run.keep("g", h.grad)
    store = seethrough.load(tmp_path / "g")
    offset = 0
    for text in TEXTS[:3]:
        ids = tok(text, return_tensors="pt")["input_ids"]
        seen = []

        def grab(module, args, output):
            output.retain_grad()
            seen.append(output)

        handle = hf.model.layers[1].register_forward_hook(grab)
        try:
            hf(input_ids=ids).logits[:, -1].sum().backward()
        finally:
            handle.remove()
            hf.zero_grad(set_to_none=True)
        n = ids.shape[1]
        torch.testing.assert_close(store["g"][offset : offset + n], seen[0].grad[0], rtol=1e-4, atol=1e-5)
        offset += n


def test_stop_ends_each_micro_batch_early(lm, smollm2_small, tmp_path):
    hf, tok = smollm2_small
    calls = []
    handle = hf.model.layers[3].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with lm.harvest(TEXTS, to=tmp_path / "s", batch_size=6, progress=False) as run:
            run.keep("resid1", lm.model.layers[1].output)
            run.stop()
    finally:
        handle.remove()
    assert calls == []  # layer 3 never ran
    ref, _, ids = alone(hf, tok, TEXTS[0], 1)
    torch.testing.assert_close(seethrough.load(tmp_path / "s")["resid1"][: len(ids)], ref, rtol=1e-4, atol=1e-4)


def test_auto_batch_size_says_what_it_chose_and_shows_progress(lm, tmp_path, capsys):
    with lm.harvest(TEXTS, to=tmp_path / "s", batch_size="auto", max_memory="20MB", max_length=16) as run:
        run.keep("resid0", lm.model.layers[0].output)
    err = capsys.readouterr().err
    assert "batch_size='auto': micro-batches of up to" in err and "memory budget 0.02 GB" in err
    assert f"{len(TEXTS)}/{len(TEXTS)} prompts" in err and "tok/s" in err and "written" in err
    budget = run.summary["token_budget"]
    assert 16 <= budget < 16 * len(TEXTS)  # 20 MB fits only a few prompts of SmolLM2's 49k-wide logits
    assert seethrough.load(tmp_path / "s").n_prompts == len(TEXTS)


def test_whole_datasets_and_bad_prompts_are_refused(lm, tmp_path):
    class FakeDataset(list):  # what a `datasets.Dataset` looks like to harvest: it has columns
        column_names = ["text", "label"]

    with pytest.raises(InputTypeError, match=r"ds\['text'\]"):
        lm.harvest(FakeDataset(TEXTS), to=tmp_path / "a")
    with pytest.raises(InputTypeError, match="mix strings and token ids"):
        with lm.harvest(["a", [1, 2]], to=tmp_path / "b", progress=False) as run:
            run.keep("resid0", lm.model.layers[0].output)
    with pytest.raises(InputTypeError, match="prompt 1 has no tokens"):
        with lm.harvest([[1, 2], []], to=tmp_path / "c", progress=False) as run:
            run.keep("resid0", lm.model.layers[0].output)
