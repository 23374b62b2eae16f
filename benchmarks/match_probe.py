"""Token-match prior switched on, untrained, in existing encoders: accuracy at fixed bonuses.

    python benchmarks/match_probe.py [CHECKPOINT] --bonus 0 3 6 10 --k 1

Adds the pointer's token-match weight to encoders trained without it (default: the shipped
ones) and sets it by hand, so the bonus on pointer scores is 0, 3, ...; generates greedy
answers on 48 fictional items built like training data but from another seed (not the eval
sets). Bonus 0 is the checkpoint as it is. Writes benchmarks/results/match_probe_k{K}.json.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--bonus", type=float, nargs="+", default=[0.0, 3.0, 6.0, 10.0])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if model.config.pointer_layer is None:
        raise SystemExit("These encoders have no pointer readout (pointer_layer); the probe needs one.")
    model.encoder.add_pointer_match()
    items = DataSpec(fictional=args.n, k=args.k, seed=999).build()
    rows = []
    for bonus in args.bonus:
        with torch.no_grad():
            model.encoder.pointer_match_weight.fill_(bonus / model.config.pointer_match_scale)
        t0 = time.time()
        r = evaluate_items(model, items, "diekae")
        row = {"bonus": bonus, **{m: round(r[m], 4) for m in ("pref", "acc", "len", "nll")},
               "seconds": round(time.time() - t0, 1), "examples": [(x["gold"], x["output"]) for x in r["records"][:8]]}
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
        rows.append(row)
    out = Path(__file__).parent / "results" / f"match_probe_k{args.k}.json"
    atomic_write_text(out, json.dumps({"checkpoint": args.checkpoint or "shipped", "n": args.n, "k": args.k,
                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
