"""Harvest layer-5 residuals of SmolLM2 over a few thousand texts, train a small
sparse autoencoder on them with plain torch, and look at what it learned.

    python examples/harvest_sae.py [--prompts 3000] [--out sae-run/] [--threads 2]

Offline: the texts are generated here (templated sentences on a few topics).
Takes a few minutes on two CPU cores; a second run reuses the harvested store
(the harvest resumes, finds every shard complete, and only checks them).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import seethrough
from seethrough import LanguageModel

TOPICS = {
    "animals": (["The cat", "A small dog", "The old horse", "My rabbit", "That parrot"],
                ["sleeps on", "runs across", "eats from", "hides under", "jumps over"],
                ["the warm blanket", "the garden fence", "a bowl of food", "the wooden table", "the green field"]),
    "cities": (["Paris", "Tokyo", "The city of Rome", "Berlin", "New York"],
               ["is known for", "has", "attracts visitors with", "was rebuilt after", "is famous for"],
               ["its museums", "a busy harbour", "old bridges", "the long war", "its night markets"]),
    "numbers": (["Two plus two", "Seven times three", "The square of nine", "Half of forty", "Ten minus four"],
                ["equals", "is", "gives", "makes", "comes to"],
                ["four", "twenty-one", "eighty-one", "twenty", "six"]),
    "code": (["The function", "This Python loop", "The compiler", "Our test suite", "The variable x"],
             ["returns", "iterates over", "rejects", "checks", "stores"],
             ["a list of strings", "every item in the array", "the syntax error", "the edge cases", "the final result"]),
    "food": (["Fresh bread", "A bowl of soup", "The chocolate cake", "Green tea", "Grilled fish"],
             ["tastes best with", "is served with", "goes well with", "is made from", "smells of"],
             ["butter and salt", "a slice of lemon", "whipped cream", "dried leaves", "garlic and herbs"]),
}


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out = []
    for _ in range(n):
        subjects, verbs, objects = TOPICS[rng.choice(names)]
        text = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if rng.random() < 0.5:  # a second clause, maybe from another topic, for varied lengths
            subjects, verbs, objects = TOPICS[rng.choice(names)]
            text += f", and {rng.choice(subjects).lower()} {rng.choice(verbs)} {rng.choice(objects)}"
        out.append(text + ".")
    return out


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(d_model, d_hidden)
        self.decoder = torch.nn.Linear(d_hidden, d_model)
        with torch.no_grad():
            self.decoder.weight.copy_(self.encoder.weight.T)
            self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decoder(f), f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3000)
    parser.add_argument("--out", default="sae-run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)

    # 1. Harvest: layer-5 residuals of every real token (padding dropped), in bfloat16.
    model = LanguageModel()
    texts = make_texts(args.prompts)
    start = time.perf_counter()
    with model.harvest(texts, to=out / "acts", batch_size="auto", max_length=64, dtype=torch.bfloat16) as run:
        run.keep("resid5", model.model.layers[5].output)
        run.stop()  # nothing after layer 5 is needed
    print(f"harvested {run.summary['tokens']:,} tokens of {run.summary['prompts']:,} prompts "
          f"in {time.perf_counter() - start:.0f} s")

    acts = seethrough.load(out / "acts")
    rows = acts["resid5"]
    print(acts, rows)

    # Position 0 carries a huge-norm "attention sink" vector in this model: leave it out.
    # Normalise by the mean and the mean norm of the other tokens (from a sample).
    positions = acts.index["position"].tensor()
    keep = (positions > 0).nonzero().flatten()
    sample = rows[keep[torch.randperm(len(keep))[:20000]]].float()
    mean = sample.mean(0)
    scale = (sample - mean).norm(dim=-1).mean()
    print(f"{len(keep):,} token rows for training (position 0 dropped); mean norm {scale:.1f}")

    # 2. Train a sparse autoencoder: reconstruction + L1 on the features.
    sae = SparseAutoencoder(rows.shape[1], args.hidden)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    l1 = 2e-2
    start = time.perf_counter()
    for epoch in range(args.epochs):
        total, steps = 0.0, 0
        for batch in acts.batches(["resid5"], batch_size=512, shuffle=True, seed=epoch, index=True):
            x = batch["resid5"][batch["_position"] > 0].float()
            x = (x - mean) / scale
            recon, f = sae(x)
            loss = (recon - x).pow(2).sum(-1).mean() + l1 * f.abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                sae.decoder.weight /= sae.decoder.weight.norm(dim=0, keepdim=True)
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch}: loss {total / steps:.4f} ({time.perf_counter() - start:.0f} s)")

    # 3. Reconstruction quality and sparsity on held-out-like rows (a fresh sample).
    with torch.no_grad():
        x = (rows[keep[torch.randperm(len(keep))[:5000]]].float() - mean) / scale
        recon, f = sae(x)
        fvu = (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        l0 = (f > 0).float().sum(-1).mean()
        # Encode every token once (chunked): firing counts and the top examples per feature.
        counts = torch.zeros(args.hidden)
        TOP = 40  # kept per feature; the distinct contexts among them are printed
        best_value = torch.full((args.hidden, TOP), -1.0)
        best_row = torch.zeros((args.hidden, TOP), dtype=torch.long)
        for start_row in range(0, len(keep), 8192):
            idx = keep[start_row : start_row + 8192]
            feats = sae.encode((rows[idx].float() - mean) / scale)
            counts += (feats > 0).sum(0)
            top = feats.topk(min(TOP, len(idx)), dim=0)
            merged_v = torch.cat([best_value, top.values.T], 1)
            merged_r = torch.cat([best_row, idx[top.indices].T], 1)
            order = merged_v.topk(TOP, dim=1).indices
            best_value, best_row = merged_v.gather(1, order), merged_r.gather(1, order)
    dead = int((counts == 0).sum())
    print(f"\nreconstruction: fraction of variance unexplained {fvu:.3f}; "
          f"L0 (features active per token) {l0:.1f} of {args.hidden}; dead features {dead}")

    # 4. Top-activating examples of a few features that fire often but not everywhere.
    prompt_of, token_of = acts.index["prompt"], acts.index["token"]
    frequency = counts / len(keep)
    candidates = ((frequency > 0.002) & (frequency < 0.05)).nonzero().flatten()
    chosen = candidates[best_value[candidates, 0].argsort(descending=True)[:6]].tolist()
    tok = model.tokenizer
    for feature in chosen:
        print(f"\nfeature {feature} (fires on {frequency[feature]:.1%} of tokens):")
        shown: set[str] = set()
        for value, row in zip(best_value[feature].tolist(), best_row[feature].tolist()):
            prompt, position = int(prompt_of[row]), int(positions[row])
            ids = tok(texts[prompt], truncation=True, max_length=64)["input_ids"]
            before, here = tok.decode(ids[max(0, position - 6) : position]), tok.decode([int(token_of[row])])
            line = f"...{before}[[{here}]]"
            if line not in shown and len(shown) < 5:
                shown.add(line)
                print(f"  {value:6.2f}  {line}")


if __name__ == "__main__":
    main()
