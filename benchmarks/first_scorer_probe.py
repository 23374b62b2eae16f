"""Can the question pick the answer's first token from the pointer trunk's states? A probe.

    python benchmarks/first_scorer_probe.py [CHECKPOINT] --n-train 1500 --epochs 6

The shipped encoders stay frozen. For items built like their training data (fictional facts
with 0-3 other facts and SQuAD-Shifts train, k in {1, 2, 3, 5}, retrieved distractors; never the
eval sets) it records, at the position that predicts the answer's first token, the pointer's
scores and the trunk states it would give the first-token scorer (``DiekaeConfig.pointer_first_scorer``:
the question's pointer state, each knowledge token's states at s-1 and s). It then trains only
the scorer's weights on these cached features to put the pointer's attention (heads weighted by
their gains) on the token where the answer starts, and reports how often the most-attended token
is that token, before and after, on held-out items of the same kind and on the dev-style fictional
items of ``pointer_settings.py`` (seed 999, k=1 and k=5). Writes
benchmarks/results/first_scorer_probe.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.training.pointer_choice import first_choice_targets

TRAIN_LIKE = dict(fictional=30000, other_facts=(0, 3), squad=28000, k=[1, 2, 3, 5], distractors="retrieved", seed=12)


class _Recorder:
    """Keeps the pointer trunk's states of every encoder call and the pointer's last scores."""

    def __init__(self, model: DiekaeModel) -> None:
        enc = model.encoder
        self.calls: list[dict] = []
        self.handles = [
            enc.register_forward_pre_hook(lambda m, a, kw: self.calls.append({"valid": a[1]}), with_kwargs=True),
            enc.norm.register_forward_hook(lambda m, a, out: self.calls[-1].__setitem__("h", out[-1])),
        ]
        self.scores = None
        self._softmax = torch.softmax

        def softmax(x, dim):  # the pointer's only softmax: keep its input (sharpness * [scores, nothing])
            self.scores = x
            return self._softmax(x, dim)
        torch.softmax = softmax

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        torch.softmax = self._softmax


def extract(model: DiekaeModel, items, desc: str) -> list[dict]:
    """Per item: question state q (d,), knowledge states H (P, d), pointer scores (heads, P+1), gold (P,)."""
    rec = _Recorder(model)
    out = []
    try:
        for it in tqdm(items, desc=desc):
            prompts, passages = model.prepare([it.question], [it.passages], "diekae")
            rec.calls.clear()
            with torch.no_grad():
                res, _, _, first = model.encode_knowledge(model.encoder, prompts, passages, None)
            seg, tail = rec.calls[0], rec.calls[-1]
            H = torch.cat([seg["h"][i][seg["valid"][i]] for i in range(seg["h"].shape[0])])
            cache = res.cache
            gold = first_choice_targets(model, cache.knowledge_ids, cache.pointer_valid, [it.answer])[0]
            t = int(first[0])
            out.append({"q": tail["h"][0, t].float(), "H": H.float(), "scores": rec.scores[0, :, t].float(),
                        "gold": gold, "valid": cache.pointer_valid[0]})
    finally:
        rec.close()
    return out


def _batch(feats: list[dict]):
    B, P, d = len(feats), max(f["H"].shape[0] for f in feats), feats[0]["H"].shape[1]
    heads = feats[0]["scores"].shape[0]
    Q = torch.stack([f["q"] for f in feats])
    H = torch.zeros(B, P, 2 * d)
    S = torch.full((B, heads, P + 1), -1e4)
    G = torch.zeros(B, P, dtype=torch.bool)
    for i, f in enumerate(feats):
        n = f["H"].shape[0]
        H[i, :n, d:] = f["H"]
        H[i, 1:n, :d] = f["H"][:-1]
        s = f["scores"].clamp(min=-1e4)
        S[i, :, :n], S[i, :, P] = s[:, :n], s[:, n]
        S[i, :, :n] = S[i, :, :n].masked_fill(~f["valid"][None], -1e4)
        G[i, :n] = f["gold"]
    return Q, H, S, G


def attention(model: DiekaeModel, feats: list[dict], scored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-mixed pointer attention over knowledge slots (B, P), with or without the scorer; gold (B, P)."""
    enc = model.encoder
    Q, H, S, G = _batch(feats)
    if scored:
        r = enc.first_scores(Q, enc.first_k(H)) * enc.config.pointer_sharpness
        S = torch.cat([S[:, :, :-1] + r[:, None], S[:, :, -1:]], -1)
    w = enc.pointer_gain.detach().abs()
    p = torch.einsum("bhs,h->bs", torch.softmax(S, -1), w / w.sum())
    return p[:, :-1], G


def top_is_gold(model: DiekaeModel, feats: list[dict], scored: bool) -> float:
    with torch.no_grad():
        p, G = attention(model, feats, scored)
    return float(G[torch.arange(len(feats)), p.argmax(-1)].float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-held", type=int, default=300)
    ap.add_argument("--n-dev", type=int, default=96)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "first_scorer_probe.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if model.config.pointer_layer is None or not model.config.per_step:
        raise SystemExit("These encoders have no per-step pointer readout; nothing to probe.")
    model.passage_cache.max_segments = 0
    items = DataSpec(**TRAIN_LIKE).build()[64: 64 + args.n_train + args.n_held]  # the first 64 are training's dev split
    feats = [f for f in extract(model, items, "train-like items") if f["gold"].any()]
    train, held = feats[: -args.n_held], feats[-args.n_held:]
    dev = {k: extract(model, DataSpec(fictional=args.n_dev, k=k, seed=999).build(), f"dev k={k}") for k in (1, 5)}
    sets = {"held_out_train_like": held, "dev_fictional_k1": dev[1], "dev_fictional_k5": dev[5]}
    result = {"checkpoint": args.checkpoint or "shipped", "n_train": len(train), "width": args.width,
              "before": {name: top_is_gold(model, f, False) for name, f in sets.items()}, "epochs": []}
    print(json.dumps(result["before"]), flush=True)

    enc = model.encoder
    enc.add_first_scorer(args.width)
    with torch.no_grad():
        enc.first_v.normal_(std=0.01)
    params = [enc.first_q.weight, enc.first_q.bias, enc.first_k.weight, enc.first_v]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = random.Random(0)
    for ep in range(args.epochs):
        rng.shuffle(train)
        total = 0.0
        for i in range(0, len(train), 32):
            p, G = attention(model, train[i: i + 32], True)
            loss = -torch.log((p * G).sum(-1) + 1e-9).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(train[i: i + 32])
        row = {"epoch": ep + 1, "train_loss": total / len(train),
               **{name: top_is_gold(model, f, True) for name, f in sets.items()}}
        result["epochs"].append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
