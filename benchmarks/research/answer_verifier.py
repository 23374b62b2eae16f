"""An answer verifier on the reader's [CLS] states: does it tell answerable items apart better than P(no answer)?

    python benchmarks/research/answer_verifier.py [--items 5000] [--n 60] [--out benchmarks/results/answer_verifier.json]

The reader's "no answer" is its start head read at [CLS]: the one linear map that also scores every
start. SQuAD 2.0 systems often add a separate verifier. This probe keeps the shipped reader frozen
and fits a logistic regression on each window's last [CLS] state (with its null logit and its best
start logit): does this window hold the answer? An item's P(no answer) is then 1 - the best window's
probability. Windows are those the reader reads in serving (``reader_margin``).

Training items: ``DataSpec(fictional, squad, k=[1, 3, 5], distractors="retrieved", negatives=0.5,
seed=41)``, leaving out every question and paragraph of the first 200 SQuAD-Shifts items drawn with
the dev seed (999), which hold the dev items of ``gate_signals.py`` and ``copy_settings.py``; 15 % of
them are held out to check the fit. Then, on the dev items of ``gate_signals.py``, the most each
signal gates while both SQuAD-Shifts sets keep a given share. Never the eval sets.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import runpy
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.data.squad import TRAIN_FILES, load_squad_items

HERE = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def window_features(model: DiekaeModel, question: str, passages: list[str]) -> tuple[np.ndarray, list[str]]:
    """(windows, hidden + 2) features of the windows the reader reads in serving, and each window's
    passage text (the span its word-pieces cover)."""
    reader = model.answer_reader
    read = [passages[i] for i in model.knowledge.reader_for(model.copy).near(question, passages)]
    batch = reader.windows([question] * len(read), read)
    kw = {k: batch[k].to(reader.device) for k in ("input_ids", "attention_mask", "token_type_ids")
          if batch.get(k) is not None}
    h = reader.bert(**kw).last_hidden_state
    logits = reader._start_logits(h, batch["spans"])
    feats = torch.cat([h[:, 0].float(), logits[:, :1], logits[:, 1:].max(1, keepdim=True).values], 1)
    texts = []
    for w in range(h.shape[0]):
        sp = batch["spans"][w]
        ok = sp[:, 0] >= 0
        a, b = (int(sp[ok, 0].min()), int(sp[ok, 1].max())) if bool(ok.any()) else (0, 0)
        texts.append(read[int(batch["pair"][w])][a:b])
    return feats.cpu().numpy(), texts


def training_items(n: int) -> list:
    """``n`` items (a fifth fictional; k in {1, 3, 5}, retrieved distractors, half without their gold
    passage), less every one that shares a question or a paragraph with the first 200 SQuAD-Shifts
    items drawn with the dev seed (999), shuffled."""
    held = load_squad_items(TRAIN_FILES, seed=999)[:200]
    dev_q, dev_p = {it.question for it in held}, {it.passage for it in held}
    items = DataSpec(fictional=n // 5, squad=n - n // 5, k=[1, 3, 5], distractors="retrieved",
                     negatives=0.5, seed=41).build()
    items = [it for it in items if it.question not in dev_q and not dev_p & set(it.passages)]
    random.Random(0).shuffle(items)
    return items


def fit(x: np.ndarray, y: np.ndarray, decay: float = 1e-3, epochs: int = 400) -> dict:
    """Logistic regression on standardised features (full batch, Adam)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mu) / sd, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + decay * (w ** 2).sum()
        loss.backward()
        opt.step()
    return {"mu": mu, "sd": sd, "w": w.detach().numpy(), "b": float(b.detach())}


def p_answer(probe: dict, feats: np.ndarray) -> float:
    """The best window's probability of holding the answer."""
    z = ((feats - probe["mu"]) / probe["sd"]) @ probe["w"] + probe["b"]
    return float(1 / (1 + math.exp(-float(z.max()))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=5000, help="training items (a fifth fictional)")
    ap.add_argument("--n", type=int, default=60, help="dev items per set")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "answer_verifier.json")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    items = training_items(args.items)
    split = int(0.85 * len(items))
    rows = {"train": ([], []), "check": ([], [])}
    for i, it in enumerate(tqdm(items, desc="reader windows")):
        feats, texts = window_features(model, it.question, list(it.passages))
        x, y = rows["train" if i < split else "check"]
        x.append(feats)
        y += [float(it.answerable and it.answer in t) for t in texts]
    x_train, y_train = np.concatenate(rows["train"][0]), np.array(rows["train"][1])
    probe = fit(x_train, y_train)
    x_check, y_check = np.concatenate(rows["check"][0]), np.array(rows["check"][1])
    z = ((x_check - probe["mu"]) / probe["sd"]) @ probe["w"] + probe["b"]
    check_acc = float(np.mean((z > 0) == (y_check > 0.5)))
    print(f"{len(items)} items, {len(y_train)} training windows ({y_train.mean():.2f} hold the answer); "
          f"held-out window accuracy {check_acc:.3f}")

    gate_signals = runpy.run_path(str(HERE / "gate_signals.py"))
    answerable, negative = gate_signals["dev_items"](args.n)
    near = model.knowledge.reader_for(model.copy)
    sig = {}
    for name, dev in {**answerable, **negative}.items():
        s = {"no_answer": [], "verifier": [], "both": []}
        for it in dev:
            q, ps = it.question, list(it.passages)
            s["no_answer"].append(math.exp(near.no_answer_log_prob(q, ps)))
            s["verifier"].append(1 - p_answer(probe, window_features(model, q, ps)[0]))
            s["both"].append((s["no_answer"][-1] + s["verifier"][-1]) / 2)
        sig[name] = s
        print(name, {k: round(float(np.median(v)), 3) for k, v in s.items()})
    points = gate_signals["operating_points"](sig, signals=("no_answer", "verifier", "both"))
    for p in points:
        print(json.dumps(p))
    atomic_write_text(args.out, json.dumps({"items": len(items), "training_windows": int(len(y_train)),
                                            "held_out_window_accuracy": check_acc, "n": args.n,
                                            "operating_points": points, "signals": sig}, indent=1))


if __name__ == "__main__":
    main()
