"""The pointer's token-match bonus and sharpness set by hand in trained encoders: accuracy per setting.

    python benchmarks/research/match_probe.py [CHECKPOINT] --bonus 0 3 6 10 --k 1
    python benchmarks/research/match_probe.py [CHECKPOINT] --sharpness 1 2 3 --k 1 --out benchmarks/results/sharpness_probe_k1.json

``--bonus`` adds the token-match weight to encoders trained without it (default: the shipped
ones) and sets it so the bonus on pointer scores is 0, 3, ...; without ``--bonus`` the
checkpoint's own weight is kept. ``--sharpness`` sets ``pointer_sharpness`` (all pointer scores
times it; default: the checkpoint's). Each (bonus, sharpness) pair is one row: greedy answers on
48 fictional items built like training data but from another seed (not the eval sets).
Writes benchmarks/results/match_probe_k{K}.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.evaluation import evaluate_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--bonus", type=float, nargs="+", default=[None])
    ap.add_argument("--sharpness", type=float, nargs="+", default=[None])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if model.config.pointer_layer is None:
        raise SystemExit("These encoders have no pointer readout (pointer_layer); the probe needs one.")
    if args.bonus != [None]:
        model.encoder.add_pointer_match()
    own_sharpness = model.copy.sharpness
    items = DataSpec(fictional=args.n, k=args.k, seed=999).build()
    rows = []
    for bonus, sharpness in itertools.product(args.bonus, args.sharpness):
        if bonus is not None:
            with torch.no_grad():
                model.encoder.copy_head.match_weight.fill_(bonus / model.config.pointer_match_scale)
        model.copy = model.copy.replace(sharpness=own_sharpness if sharpness is None else sharpness)
        t0 = time.time()
        r = evaluate_items(model, items, "diekae")
        row = {"bonus": bonus, "sharpness": model.copy.sharpness,
               **{m: round(r[m], 4) for m in ("pref", "acc", "len", "nll")},
               "seconds": round(time.time() - t0, 1), "examples": [(x["gold"], x["output"]) for x in r["records"][:8]]}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        rows.append(row)
    out = args.out or Path(__file__).parents[1] / "results" / f"match_probe_k{args.k}.json"
    atomic_write_text(out, json.dumps({"checkpoint": args.checkpoint or "shipped", "n": args.n, "k": args.k,
                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
