"""What ``reader_margin`` saves on passages a retriever returns, not the benchmark's unrelated ones.

    python benchmarks/research/reader_margin_cost.py [--n 30] [--margins 0 0.3]

For dev items at k=5 with retrieved distractors (fictional and SQuAD-Shifts train, seed 999, as
``copy_settings.py --retrieved``), with their passages precomputed, the median time to the first
token per margin (the margins take turns on each item; the reader's kept answers and the question
vectors are cleared before each call), the bare decoder's, and how many passages the reader read.
Writes benchmarks/results/<device>/reader_margin_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import hardware
from diekae_rag.data.mixture import DataSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained().warm_up()
    embedder = model.passage_prior.embedder
    sets = {"fictional_k5_retrieved": DataSpec(fictional=args.n, k=5, seed=999, distractors="retrieved").build(),
            "squad_train_k5_retrieved": DataSpec(fictional=0, squad=args.n, k=5, seed=999,
                                                 distractors="retrieved").build()}
    rows = []
    for name, items in sets.items():
        model.precompute([p for it in items for p in it.passages])
        times = {m: [] for m in ["none", *args.margins]}
        read = {m: [] for m in args.margins}
        for it in items:
            for m in ["none", *args.margins]:
                model.answer_reader.clear()
                embedder.forget_queries()
                t = time.perf_counter()
                if m == "none":
                    model.generate(it.question, mode="none", max_new_tokens=1)
                else:
                    model.generate(it.question, it.passages, max_new_tokens=1, copy={"reader_margin": m})
                times[m].append(time.perf_counter() - t)
            for m in args.margins:
                reader = model.knowledge.reader_for(model.copy.replace(reader_margin=m))
                near = reader.near(it.question, it.passages) if m else it.passages
                read[m].append(len(near))
        row = {"set": name, "n": len(items),
               "ttft_ms": {str(m): round(statistics.median(v) * 1000, 1) for m, v in times.items()},
               "passages_read": {str(m): round(statistics.mean(v), 2) for m, v in read.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    hw = hardware(model.device)
    out = args.out / ("cuda" if model.device.type == "cuda" else "cpu") / "reader_margin_cost.json"
    atomic_write_text(out, json.dumps({"hardware": hw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
