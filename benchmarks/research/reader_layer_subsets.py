"""Which layers of the shipped answer-start reader a smaller joint reader should start from.

    python benchmarks/research/reader_layer_subsets.py [--n 100] [--out benchmarks/results/reader_layer_subsets.json]

Each subset of the shipped reader's 6 MiniLM layers (``AnswerStartReader.keep_layers``), untrained,
on the reader's own dev rows (``training/reader.py``: share of items whose top start is right, "no
answer" on top for the negative sets). The subset a distillation starts from is chosen here, on dev items.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diekae_rag.answer_reader import AnswerStartReader
from diekae_rag.atomic import atomic_write_text
from diekae_rag.training.reader import dev_row, dev_sets

SUBSETS = ([0, 2, 4], [0, 2, 4, 5], [0, 1, 3, 5], [0, 1, 2, 3], [1, 2, 4, 5], [0, 1, 2, 5], [0, 1, 4, 5], [0, 2, 3, 5])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reader", default="diekae_rag/weights/smollm2-135m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/reader_layer_subsets.json")
    args = ap.parse_args()
    dev = dev_sets(args.n)
    rows = []
    for layers in SUBSETS:
        reader = AnswerStartReader.from_pretrained(args.reader).eval()
        reader.keep_layers(layers)
        t = time.time()
        with torch.no_grad():
            row = {"layers": layers, **{k: round(v, 3) for k, v in dev_row(reader, dev).items()},
                   "seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps({"reader": args.reader, "n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
