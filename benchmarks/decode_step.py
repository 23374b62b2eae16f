"""Decode-step cost of per-step injection against the bare decoder, robust to a noisy machine.

    python benchmarks/decode_step.py [--ks 5 10] [--pairs 8] [--out benchmarks/results]

For each k, `none` and `diekae` (passages precomputed) alternate; each sample is
(time for 34 new tokens − time for 2) / 32, and the medians over the pairs are compared.
Writes <out>/<device>/decode_step.json.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.bench import bench_passages, hardware, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    rows = []
    out = Path(args.out) / model.device.type
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for k in args.ks:
            q, passages = bench_passages(model, k)
            model.precompute(passages)

            def seconds(mode: str, n: int) -> float:
                return timed(lambda: model.generate(q, passages, mode=mode, max_new_tokens=n, min_new_tokens=n),
                             model.device)

            samples: dict[str, list[float]] = {"none": [], "diekae": []}
            for mode in samples:
                seconds(mode, 4)  # warm-up
            for _ in range(args.pairs):
                for mode in samples:
                    samples[mode].append((seconds(mode, 34) - seconds(mode, 2)) / 32)
            none, diekae = statistics.median(samples["none"]), statistics.median(samples["diekae"])
            rows.append({"k": k, "none_step_ms": none * 1000, "diekae_step_ms": diekae * 1000,
                         "ratio": diekae / none, "samples": samples})
            print(f"k={k}: decode step none {none * 1000:.1f} ms, diekae {diekae * 1000:.1f} ms, "
                  f"ratio {diekae / none:.2f}", flush=True)
            # written after every k, so a run cut short keeps the rows it finished
            atomic_write_text(out / "decode_step.json", json.dumps({"hardware": hardware(model.device),
                                                                    "pairs": args.pairs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
