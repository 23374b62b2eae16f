"""Do two versions of the code give the shipped model the same answers?

    python benchmarks/same_answers.py --out answers_before.json            # on one version
    python benchmarks/same_answers.py --out after.json --compare answers_before.json

Records the greedy answers (``mode="diekae"``, 24 new tokens, as ``diekae-rag eval``) of the
shipped model on the nine eval rows (fictional seen / unseen and SQuAD dev A; k=1, k=5 with random
distractors, k=5 with retrieved ones; 60 items each), on the two negative sets (closed_book and
unanswerable, 76 items each, as ``make figures``) and on 200 dev items (fictional k=1 and k=5,
SQuAD-Shifts train k=1, seed 999, as ``copy_settings.py``), and the gold answer's NLL on the dev
items. ``--compare`` prints how many answers are identical per row and the largest NLL difference,
and exits 1 when any answer differs. A behaviour-preserving change must give 0 differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.data.mixture import DataSpec, eval_sets
from diekae_rag.data.negatives import closed_book, unanswerable


def rows(n: int, n_dev: int) -> dict[str, list]:
    """Every row's items, by name."""
    out = {}
    for k, distractors in ((1, "random"), (5, "random"), (5, "retrieved")):
        for name, items in eval_sets(n=n, k=k, distractors=distractors).items():
            out[f"eval/{name}@k={k}/{distractors}"] = items
    out["eval/closed_book@k=3"] = closed_book("eval", 76)
    out["eval/unanswerable@k=5"] = unanswerable("eval", 76)
    third = n_dev // 3
    out["dev/fictional_k1"] = DataSpec(fictional=n_dev - 2 * third, k=1, seed=999).build()
    out["dev/fictional_k5"] = DataSpec(fictional=third, k=5, seed=999).build()
    out["dev/squad_train_k1"] = DataSpec(fictional=0, squad=third, k=1, seed=999).build()
    return out


def record(model: DiekaeModel, items, score: bool, batch_size: int = 16) -> dict:
    answers, nll = [], []
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        qs, ks = [e.question for e in batch], [e.passages for e in batch]
        answers += model.generate_batch(qs, ks, mode="diekae", max_new_tokens=24)
        if score:
            nll += model.score_batch(qs, [e.answer for e in batch], ks, mode="diekae")
    return {"answers": answers, "nll": nll}


def compare(new: dict, old: dict) -> int:
    """Print the per-row agreement; the number of answers that differ."""
    differ = 0
    for key in old:
        a, b = old[key]["answers"], new.get(key, {}).get("answers", [])
        same = sum(x == y for x, y in zip(a, b))
        d_nll = max((abs(x - y) for x, y in zip(old[key]["nll"], new.get(key, {}).get("nll", []))), default=0.0)
        differ += len(a) - same
        print(f"{key:45s} identical {same:3d}/{len(a):3d}   max |NLL diff| {d_nll:.2e}")
        for x, y in list((x, y) for x, y in zip(a, b) if x != y)[:3]:
            print(f"    was {x!r}\n    now {y!r}")
    print(f"answers that differ: {differ}")
    return differ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, default=None, help="answers JSON of the other version")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--n-dev", type=int, default=200)
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    result = {}
    for key, items in rows(args.n, args.n_dev).items():
        result[key] = record(model, items, score=key.startswith("dev/"))
        print(key, len(items), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.compare is not None:
        return 1 if compare(result, json.loads(args.compare.read_text())) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
