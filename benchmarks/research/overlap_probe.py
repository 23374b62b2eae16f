"""Would the answer-start reader cost less run beside the decoder, on a second thread? (CPU probe.)

    python benchmarks/research/overlap_probe.py [--k 5] [--repeats 9] [--out benchmarks/results/cpu/overlap_probe.json]

The reader and the decoder's layers below the first injected one do not depend on each other, so
on a CPU with two cores they could run at once. This times, medians of ``--repeats`` (the first two
left out):
- ``decoder``: the bare decoder's first token over the benchmark question (``mode="none"``);
- ``reader``: the reader reading the question against the nearest benchmark passage, 3 times (about
  what the encoders' trunk and the reader together cost a call);
- both one after the other, and both at once on two Python threads, with every thread using torch's
  threads (the default), and with the reader's thread on one.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import bench_passages, hardware, median_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/overlap_probe.json"))
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    q, passages = bench_passages(model, args.k)
    reader = model.answer_reader

    def decoder() -> None:
        model.generate(q, passages, mode="none", max_new_tokens=1)

    def read() -> None:
        for _ in range(3):
            reader.read_pairs([q], [passages[0]])

    def at_once(reader_threads: int | None):
        def run() -> None:
            def worker() -> None:
                with torch.inference_mode():
                    if reader_threads:
                        torch.set_num_threads(reader_threads)
                    read()
            thread = threading.Thread(target=worker)
            thread.start()
            decoder()
            thread.join()
        return run

    def median_ms(fn) -> float:  # the first two calls left out
        return median_time(fn, args.repeats - 2, model.device, warm_ups=2) * 1000

    threads = torch.get_num_threads()
    rows = []
    with torch.inference_mode():
        for _ in range(2):
            torch.set_num_threads(threads)
            row = {"decoder": median_ms(decoder), "reader": median_ms(read)}
            row["one_after_the_other"] = row["decoder"] + row["reader"]
            row["at_once"] = median_ms(at_once(None))
            row["at_once_reader_on_one_thread"] = median_ms(at_once(1))
            torch.set_num_threads(threads)
            rows.append({k: round(v, 1) for k, v in row.items()})
            print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"hardware": hardware(model.device), "threads": threads,
                                            "k": args.k, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
