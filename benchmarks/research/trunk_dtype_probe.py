"""Would the encoders' work in a call cost less in bfloat16? (CPU probe.)

    python benchmarks/research/trunk_dtype_probe.py [--k 5] [--repeats 11] [--out benchmarks/results/cpu/trunk_dtype_probe.json]

The reader serves in bfloat16 where the CPU has AVX512-BF16 or AMX, which halved its time. This
times the first token at k passages (precomputed, the question's MiniLM vector made before each
call as retrieval makes it) of the bare decoder, of DIEKÆ as it serves, and of DIEKÆ with the
encoders' call (their trunk over the question and the copy readout: ``KnowledgeEncoding.encode``)
under ``torch.autocast`` to bfloat16; the three take turns, medians of ``--repeats`` after one
untimed round. It also writes both DIEKÆ forms' answers to the benchmark question.

Autocast casts the weights and the passages' keys and values in every call. So the encoders' call
over the question (the tail, against the passages' cached keys and values) is also timed alone, with
the weights and the cached states in float32 and with both cast to bfloat16 beforehand (medians of
``--repeats`` × 4), with how far the bfloat16 rows and trunk states lie from the float32 ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from bench import bench_passages, hardware
from diekae_rag.encoder import EncoderCache

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
        tail = tail_call(model, q, passages, 4 * args.repeats)
    result = {"hardware": hardware(model.device), "k": args.k, "repeats": args.repeats, "ttft_ms": ms,
              "ratio_to_none": {name: round(v / ms["none"], 3) for name, v in ms.items()}, "answers": answers,
              "tail_call": tail}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def tail_call(model: DiekaeModel, question: str, passages: list[str], repeats: int) -> dict:
    """The encoders' call over the question alone, in float32 and with weights and cached states cast
    to bfloat16 beforehand: median ms each, and the bfloat16 rows' and states' relative distance."""
    encoder, seen = model.encoder, {}
    forward = encoder.forward

    def keep_tail_call(*a, **kw):  # the call that continues from the passages' cached states
        if kw.get("cache") is not None:
            seen.setdefault("call", (a, kw))
        return forward(*a, **kw)

    encoder.forward = keep_tail_call
    try:
        model.generate(question, passages, max_new_tokens=1)
    finally:
        del encoder.forward
    (ids, mask), kw = seen["call"]
    half = copy.deepcopy(encoder).attach(model.decoder).to(torch.bfloat16)
    cache = kw["cache"]
    half_cache = EncoderCache([(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in cache.kv],
                              cache.key_valid, cache.next_position)
    calls = {"float32": lambda: encoder(ids, mask, cache=cache),
             "bfloat16": lambda: half(ids, mask, cache=half_cache)}
    times = {name: [] for name in calls}
    for _ in range(repeats + 1):
        for name, f in calls.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    full, cast = calls["float32"](), calls["bfloat16"]()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float((a - b.float()).norm() / a.norm()), 4)

    return {"ms": {name: round(statistics.median(ts[1:]) * 1000, 2) for name, ts in times.items()},
            "positions": list(ids.shape), "past_positions": int(cache.kv[0][0].shape[3]),
            "rows_rel_distance": rel(full.rows, cast.rows), "states_rel_distance": rel(full.states, cast.states)}


if __name__ == "__main__":
    main()
