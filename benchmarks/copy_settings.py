"""Copy settings on trained encoders: accuracy per setting, on dev items.

    python benchmarks/copy_settings.py [CHECKPOINT] --grid bigram_bonus=3 sharpness=2 first_gain=1.4,2 --n 96

Each combination of the ``--grid`` values (``CopyConfig`` fields: they change no weights) is one
row, scored like ``diekae-rag eval`` (preference, greedy contains-answer accuracy, length, NLL, and
``loops``: the share of answers that repeat a word of four or more letters, i.e. that run on) on
dev items that are not the eval sets: fictional items built like training data from another seed
(as ``match_probe.py``) at k=1 and k=5 (random distractors), and SQuAD-Shifts training items at
k=1. ``--multi`` adds fictional passages that hold one to three other facts of the same subject
at k=3 (the reader's multi-fact dev set, another seed), where the choice of where the copy starts is
harder. ``--retrieved`` adds fictional and SQuAD-Shifts items at k=5 with the retriever's nearest
passages as distractors, where the passage prior and ``reader_margin`` choose among close passages.
``--negatives`` adds the dev halves of the negative sets (``closed_book`` dev and
``unanswerable`` dev: accuracy, copy rate and the share the copy gate closes on), for settings
that should step aside where the passages do not answer. Writes
benchmarks/results/copy_settings.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.config import parse_grid
from diekae_rag.data.mixture import DataSpec
from diekae_rag.data.negatives import closed_book, unanswerable
from diekae_rag.evaluation import evaluate_items, evaluate_negatives


def loops(answer: str) -> bool:
    """True when a word of four or more letters occurs twice: the answer runs on, repeating itself."""
    words = [w for w in re.findall(r"\w+", answer.lower()) if len(w) >= 4]
    return len(words) != len(set(words))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--grid", nargs="+", required=True)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--multi", action="store_true", help="also fictional passages with 1-3 other facts, k=3")
    ap.add_argument("--retrieved", action="store_true", help="also fictional and SQuAD-Shifts items, k=5 retrieved")
    ap.add_argument("--negatives", action="store_true", help="also the dev halves of closed_book and unanswerable")
    ap.add_argument("--reader-dtype", choices=["float32", "bfloat16"], default=None,
                    help="the answer-start reader's dtype (default: the one it serves in here)")
    ap.add_argument("--encoder-dtype", choices=["float32", "bfloat16"], default=None,
                    help="the encoders' dtype over the question and decode steps (default: the one they serve in here)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "copy_settings.json")
    args = ap.parse_args()
    try:
        grid = parse_grid(args.grid)
    except ValueError as exc:
        raise SystemExit(f"--grid: {exc}") from None
    model = DiekaeModel.from_pretrained(args.checkpoint, reader_dtype=args.reader_dtype and getattr(torch, args.reader_dtype),
                                        encoder_dtype=args.encoder_dtype and getattr(torch, args.encoder_dtype))
    own = {name: getattr(model.copy, name) for name in grid}
    sets = {
        "fictional_k1": DataSpec(fictional=args.n, k=1, seed=999).build(),
        "squad_train_k1": DataSpec(fictional=0, squad=args.n, k=1, seed=999).build(),
        "fictional_k5": DataSpec(fictional=args.n, k=5, seed=999).build(),
    }
    if args.multi:
        sets["fictional_multi_k3"] = DataSpec(fictional=args.n, other_facts=(1, 3), k=3, seed=999).build()
    if args.retrieved:
        for name, fictional, squad in (("fictional_k5_retrieved", args.n, 0), ("squad_train_k5_retrieved", 0, args.n)):
            sets[name] = DataSpec(fictional=fictional, squad=squad, k=5, seed=999, distractors="retrieved").build()
    negatives = {"closed_book_dev": closed_book("dev"), "unanswerable_dev": unanswerable("dev", args.n)} \
        if args.negatives else {}
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        copy = model.copy.replace(**setting)
        copy.check_for(model.config)
        row = {"setting": setting}
        for set_name, items in sets.items():
            t0 = time.time()
            r = evaluate_items(model, items, "diekae", copy=copy)
            row[set_name] = {**{m: round(r[m], 4) for m in ("pref", "acc", "em", "f1", "gated", "len", "nll")},
                             "loops": round(sum(loops(x["output"]) for x in r["records"]) / len(items), 4),
                             "seconds": round(time.time() - t0, 1)}
        for set_name, items in negatives.items():
            r = evaluate_negatives(model, items, "diekae", copy=copy)
            row[set_name] = {m: round(r[m], 4) for m in ("acc", "f1", "copy", "gated")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    atomic_write_text(args.out, json.dumps({"checkpoint": args.checkpoint or "shipped", "n": args.n,
                                            "reader_dtype": str(model.answer_reader.head.weight.dtype)
                                            if model.answer_reader is not None else None,
                                            "encoder_dtype": str(model.knowledge.encoder_dtype or model.encoder.dtype),
                                            "checkpoint_setting": own, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
