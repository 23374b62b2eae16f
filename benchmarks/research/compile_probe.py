"""Does torch.compile speed up the parts that compile_decode leaves eager? (CPU probe.)

    python benchmarks/research/compile_probe.py [--k 5] [--steps 40] [--repeats 9]

Times, eager and under ``torch.compile(dynamic=True)``:
- the encoders' own decode step (one token through the stacked trunks against the cached
  passages, then the copy readout), as ``benchmarks/decode_step.py`` times it; inside the compiled
  graph ``append_kv`` is a plain ``cat`` (its in-place ``as_strided`` write does not trace);
- the answer-start reader reading one new question against k passages.
Medians, first call (compiling) excluded. Writes benchmarks/results/<device>/compile_probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diekae_rag.encoder as encoder_module
from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import bench_passages, hardware, median_time
from diekae_rag.injection import layer_rows_from


def median_ms(fn, n: int, device: torch.device) -> float:
    return median_time(fn, n, device, warm_ups=0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # the encoders' cache grows each step
    model = DiekaeModel.from_pretrained()
    q, passages = bench_passages(model, args.k)
    prompts, knowledge = model.prepare([q], [passages], "diekae")
    ids = torch.tensor([[model.prompter.ids(" the")[0]]], device=model.device)
    ones = torch.ones_like(ids, dtype=torch.bool)
    eager_append = encoder_module.append_kv

    def append_traceable(past, new, room=64):
        return torch.cat([past, new], 3) if torch.compiler.is_dynamo_compiling() else eager_append(past, new, room)
    encoder_module.append_kv = append_traceable

    def step(cache, readout):
        out = model.encoder(ids, ones, cache=cache, use_cache=True)
        return layer_rows_from(model.encoder.config, out.rows, readout(out.states, ids)), out.cache

    row: dict = {"k": args.k, "hardware": hardware(model.device)}
    with torch.inference_mode():
        for name, fn in (("eager", step), ("compiled", torch.compile(step, dynamic=True))):
            pre = model.knowledge.encode(model.encoder, prompts, knowledge, copy=model.copy,
                                         providers=model.knowledge.providers(model.copy))
            state = {"cache": pre.out.cache}

            def one():
                state["cache"] = fn(state["cache"], pre.readout)[1]
            one()  # compiles
            row[f"encoder_step_{name}_ms"] = median_ms(one, args.steps, model.device)
        reader = model.answer_reader
        row["reader_dtype"] = str(next(reader.parameters()).dtype)

        def read():
            reader.clear()
            reader._char_log_probs(f"{q} {time.perf_counter()}", passages)  # a new question each call
        read()
        row["reader_eager_ms"] = median_ms(read, args.repeats, model.device)
        reader.bert = torch.compile(reader.bert, dynamic=True)
        read()  # compiles
        row["reader_compiled_ms"] = median_ms(read, args.repeats, model.device)
    print(json.dumps(row, indent=2))
    out = Path(args.out) / model.device.type
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compile_probe.json", json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
