"""The passage prior at serving time: accuracy with k=5 passages per pointer-prior strength.

    python benchmarks/research/passage_prior.py [CHECKPOINT] --strength 0 10 30 100 oracle

Each strength is one row (0: no prior; "oracle": the gold passage gets 0, every other -100,
an upper bound for passage choice), scored like ``diekae-rag eval`` (preference, greedy
contains-answer accuracy, length, NLL) on dev items that are not the eval sets: 48 fictional
items built like training data from another seed (as ``match_probe.py``), with random and with
retrieved distractors, and 48 SQuAD-Shifts training items with random distractors. Also gives
how often the embedder puts the gold passage first. Writes benchmarks/results/passage_prior.json
unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.evaluation import contains, evaluate_items
from diekae_rag.copy import PassagePrior


def gold_index(item) -> int:
    """The one passage that contains the answer, or -1 when none or several do."""
    hits = [i for i, p in enumerate(item.passages) if contains(p, item.answer)]
    return hits[0] if len(hits) == 1 else -1


class OraclePrior(PassagePrior):
    """The gold passage 0, all others -100 (items without a unique gold passage: no prior)."""

    def __init__(self, items) -> None:
        super().__init__()
        self.gold = {it.question: gold_index(it) for it in items}

    def __call__(self, questions, passages, strength):
        out = []
        for q, ps in zip(questions, passages):
            g = self.gold.get(q, -1)
            out.append([0.0 if (g < 0 or i == g) else -100.0 for i in range(len(ps))])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--strength", nargs="+", default=["0", "10", "30", "100", "oracle"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "passage_prior.json")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    sets = {
        "fictional_random": DataSpec(fictional=args.n, k=args.k, seed=999).build(),
        "fictional_retrieved": DataSpec(fictional=args.n, k=args.k, seed=999, distractors="retrieved").build(),
        "squad_train_random": DataSpec(fictional=0, squad=args.n, k=args.k, seed=999).build(),
    }
    probe = model.passage_prior
    out: dict = {"checkpoint": args.checkpoint or "shipped", "n": args.n, "k": args.k, "sets": {}}
    for name, items in sets.items():
        golds = [gold_index(it) for it in items]
        priors = probe([it.question for it in items], [it.passages for it in items], 1.0)
        known = [(g, p) for g, p in zip(golds, priors) if g >= 0]
        top1 = float(np.mean([int(np.argmax(p)) == g for g, p in known])) if known else None
        rows = []
        for s in args.strength:
            model.passage_prior = OraclePrior(items) if s == "oracle" else probe
            model.copy = model.copy.replace(passage_prior=1.0 if s == "oracle" else float(s))
            t0 = time.time()
            r = evaluate_items(model, items, "diekae")
            row = {"strength": s, **{m: round(r[m], 4) for m in ("pref", "acc", "len", "nll")},
                   "seconds": round(time.time() - t0, 1)}
            print(name, json.dumps(row), flush=True)
            rows.append(row)
        out["sets"][name] = {"gold_found": len(known), "embedder_top1_is_gold": top1, "rows": rows}
        print(name, "embedder top-1 is gold:", top1, f"({len(known)} items with one gold passage)", flush=True)
    atomic_write_text(args.out, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
