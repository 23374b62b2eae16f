"""Would the encoders' work in a call cost less in bfloat16? (CPU probe.)

    python benchmarks/research/trunk_dtype_probe.py [--k 5] [--repeats 11] [--out benchmarks/results/cpu/trunk_dtype_probe.json]

The reader serves in bfloat16 where the CPU has AVX512-BF16 or AMX, which halved its time. This
times the first token at k passages (precomputed, the question's MiniLM vector made before each
call as retrieval makes it) of the bare decoder, of DIEKÆ as it serves, and of DIEKÆ with the
encoders' call (their trunk over the question and the copy readout: ``KnowledgeEncoding.encode``)
under ``torch.autocast`` to bfloat16; the three take turns, medians of ``--repeats`` after one
untimed round. It also writes both DIEKÆ forms' answers to the benchmark question.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.bench import bench_passages, hardware

FORMS = ("none", "float32", "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/trunk_dtype_probe.json"))
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    q, passages = bench_passages(model, args.k)
    embedder, knowledge = model.passage_prior.embedder, model.knowledge
    encode, form = knowledge.encode, {"name": "float32"}

    def encode_in_form(*a, **kw):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if form["name"] == "bfloat16" else contextlib.nullcontext()
        with ctx:
            return encode(*a, **kw)

    knowledge.encode = encode_in_form

    def call(name: str, new_tokens: int = 1):
        model.answer_reader.clear()
        embedder.forget_queries()
        if name != "none":
            embedder.encode_queries([q])  # as retrieval does, before the call
        form["name"] = name
        t = time.perf_counter()
        text = model.generate(q, passages, mode="none" if name == "none" else "diekae", max_new_tokens=new_tokens)
        return time.perf_counter() - t, text

    with torch.inference_mode():
        times = {name: [] for name in FORMS}
        for i in range(args.repeats + 1):
            for name in FORMS:
                t, _ = call(name)
                if i:
                    times[name].append(t)
        ms = {name: round(statistics.median(ts) * 1000, 1) for name, ts in times.items()}
        answers = {name: call(name, 12)[1] for name in FORMS[1:]}
    result = {"hardware": hardware(model.device), "k": args.k, "repeats": args.repeats, "ttft_ms": ms,
              "ratio_to_none": {name: round(v / ms["none"], 3) for name, v in ms.items()}, "answers": answers}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
