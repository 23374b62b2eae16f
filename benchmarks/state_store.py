"""Stored passage states: quality of float16, int8 and int4 storage against encoding, and their size.

    python benchmarks/state_store.py [CHECKPOINT] [--n 60]

On dev items (fictional at k=5 and SQuAD-Shifts *train* items at k=1, seed 999: never the eval
sets), the passages' states are computed into a store of each dtype, then every item is scored and
answered by a fresh model that reads them from disk; the reference encodes the passages in the call.
Reports accuracy, exact match, F1, mean answer NLL and answers that differ from the reference, bytes per knowledge
token, and the disk use extrapolated to 1,000, 10,000 and 100,000 chunks of the store's mean chunk
length. Writes benchmarks/results/state_store.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.evaluation import evaluate_items
from diekae_rag.indexing import attach_states, index_states

DTYPES = ("float16", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "state_store.json")
    args = ap.parse_args()
    sets = {"fictional_k5": DataSpec(fictional=args.n, k=5, seed=999).build(),
            "squad_train_k1": DataSpec(fictional=0, squad=args.n, k=1, seed=999).build()}
    passages = sorted({p for items in sets.values() for it in items for p in it.passages})
    ref = DiekaeModel.from_pretrained(args.checkpoint)
    ref.knowledge.passage_cache.max_segments = 0  # encode in every call
    reference = {name: evaluate_items(ref, items, "diekae") for name, items in sets.items()}
    result = {"checkpoint": args.checkpoint or "shipped", "n": args.n, "passages": len(passages),
              "encoded": {name: {m: round(r[m], 4) for m in ("acc", "em", "f1", "nll")} for name, r in reference.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            store = index_states(ref, passages, Path(tmp) / dtype, dtype=dtype)
            tokens = store.knowledge_tokens()
            model = DiekaeModel.from_pretrained(args.checkpoint)
            model.knowledge.passage_cache.max_segments = 0  # every call reads the store
            attach_states(model, Path(tmp) / dtype)
            row = {"bytes": store.bytes, "knowledge_tokens": tokens, "bytes_per_token": round(store.bytes / tokens, 1)}
            per_chunk = store.bytes / len(passages)
            row["disk_mb_per"] = {str(n): round(per_chunk * n / 2**20, 1) for n in (1_000, 10_000, 100_000)}
            for name, items in sets.items():
                r = evaluate_items(model, items, "diekae")
                differ = sum(a["output"] != b["output"] for a, b in zip(r["records"], reference[name]["records"]))
                row[name] = {**{m: round(r[m], 4) for m in ("acc", "em", "f1", "nll")}, "answers_differ": differ,
                             "stored_reads": model.knowledge.passage_cache.stored}
            result[dtype] = row
            print(json.dumps({dtype: row}), flush=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(json.dumps(result["encoded"]))


if __name__ == "__main__":
    main()
