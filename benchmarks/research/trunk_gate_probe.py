"""Does the encoders' pointer trunk know whether the passages answer? A probe beside the reader's P(no answer).

    python benchmarks/research/trunk_gate_probe.py [--items 2000] [--n 60] [--out benchmarks/results/trunk_gate_probe.json]

One lead of the gate issue is a gate head on the encoder's tail state. The pointer trunk reads the
question over every passage's states, and its state at the position that predicts the answer's first
token is what the copy reads from. This keeps the shipped encoders and reader frozen and fits, per
item, a logistic regression for "the passages hold the answer" on
- ``reader``: the reader's best [CLS] logit, best start logit and log P(no answer) (windows as served);
- ``trunk``: the trunk's state at that position (d_enc values);
- ``both``: the two together.
An item's P(no answer) is 1 - the probe's probability. Training items: as in
``answer_verifier.py`` (its data and its exclusion of the dev items), ``--items`` of them, 15 % held
out to check the fit. Then, on the dev items of ``gate_signals.py``, the most each gates while both
SQuAD-Shifts sets keep a given share, beside P(no answer). Never the eval sets.
"""

from __future__ import annotations

import argparse
import json
import math
import runpy
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text

HERE = Path(__file__).resolve().parents[1]
VERIFIER = runpy.run_path(str(Path(__file__).with_name("answer_verifier.py")))


@torch.inference_mode()
def item_features(model: DiekaeModel, question: str, passages: list[str]) -> dict[str, np.ndarray]:
    """The reader's and the trunk's features of one (question, passages) item."""
    windows, _ = VERIFIER["window_features"](model, question, passages)
    null = model.knowledge.reader_for(model.copy).no_answer_log_prob(question, passages)
    reader = np.array([windows[:, -2].max(), windows[:, -1].max(), null], dtype=np.float32)
    prompts, knowledge = model.prepare([question], [passages])
    enc = model.knowledge.encode(model.encoder, prompts, knowledge, copy=model.copy)
    trunk = enc.out.states[0, int(enc.first[0])].float().cpu().numpy()
    return {"reader": reader, "trunk": trunk, "both": np.concatenate([reader, trunk])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "trunk_gate_probe.json")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    items = VERIFIER["training_items"](args.items)
    split = int(0.85 * len(items))
    feats = [item_features(model, it.question, list(it.passages)) for it in tqdm(items, desc="items")]
    y = np.array([float(it.answerable) for it in items])
    probes, check = {}, {}
    for kind in ("reader", "trunk", "both"):
        x = np.stack([f[kind] for f in feats])
        probes[kind] = VERIFIER["fit"](x[:split], y[:split])
        z = ((x[split:] - probes[kind]["mu"]) / probes[kind]["sd"]) @ probes[kind]["w"] + probes[kind]["b"]
        check[kind] = round(float(np.mean((z > 0) == (y[split:] > 0.5))), 3)
    print(f"{len(items)} items ({y.mean():.2f} answerable); held-out accuracy {check}")

    gate_signals = runpy.run_path(str(HERE / "gate_signals.py"))
    answerable, negative = gate_signals["dev_items"](args.n)
    sig = {}
    for name, dev in {**answerable, **negative}.items():
        s = {"no_answer": [], "reader": [], "trunk": [], "both": []}
        for it in dev:
            f = item_features(model, it.question, list(it.passages))
            s["no_answer"].append(math.exp(float(f["reader"][2])))
            for kind, probe in probes.items():
                z = float(((f[kind] - probe["mu"]) / probe["sd"]) @ probe["w"] + probe["b"])
                s[kind].append(1 / (1 + math.exp(z)))  # 1 - P(answerable)
        sig[name] = s
        print(name, {k: round(float(np.median(v)), 3) for k, v in s.items()})
    points = gate_signals["operating_points"](sig, signals=("no_answer", "reader", "trunk", "both"))
    for p in points:
        print(json.dumps(p))
    atomic_write_text(args.out, json.dumps({"items": len(items), "held_out_accuracy": check, "n": args.n,
                                            "operating_points": points, "signals": sig}, indent=1))


if __name__ == "__main__":
    main()
