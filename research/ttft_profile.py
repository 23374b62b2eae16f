"""Where DIEKÆ's time to the first token goes at k passages (CPU, the shipped model).

    python research/ttft_profile.py [--k 5] [--calls 10] [--out benchmarks/results/cpu/ttft_profile.txt]

Three parts, written to ``--out``:
1. time to the first token of the bare decoder, DIEKÆ with the passages precomputed and DIEKÆ
   with their states read from a store on disk, the three taking turns (medians of 7), and how many
   segments one call from the store reads from it and encodes (those no index holds);
2. a cProfile of ``--calls`` precomputed calls, cumulative time of this package's functions and
   of the MiniLM models they call (the gate, the reader, the encoders' session, the copy readout);
3. with ``--ops``, a ``torch.profiler`` table of the gate and of the encoders' session alone (no
   decoder), op by op and input shape, over ``--calls`` precomputed calls, with their medians;
4. what the copy needs of the tokens of k new chunk-sized passages (spans, first pieces, answer
   pieces): made by tokenising, and read back from the store.
As in ``benchmarks/run.py``, the question's MiniLM vector is made before each timed call, as the
retriever makes it in serving.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench import bench_passages, hardware  # noqa: E402
from diekae_rag.copy.pieces import PassageTokens
from diekae_rag.data.fictional import make_facts
from diekae_rag.indexing import index_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--ops", action="store_true", help="also profile the gate and the session op by op")
    ap.add_argument("--out", default="benchmarks/results/cpu/ttft_profile.txt")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    q, passages = bench_passages(model, args.k)
    tmp = tempfile.TemporaryDirectory()
    store = index_states(model, passages, Path(tmp.name) / "states", progress=False)
    embedder = model.passage_prior.embedder
    out = io.StringIO()
    out.write(f"{hardware(model.device)}, k={args.k}\n\n")

    def call(label: str) -> float:
        model.answer_reader.clear()
        embedder.forget_queries()
        if label != "none":
            embedder.encode_queries([q])  # as retrieval does, before the call
        if label == "store":
            model.knowledge.passage_cache.clear()
            model.passage_prior.clear()
        model.knowledge.attach_store(store if label == "store" else None, model.encoder)
        t = time.perf_counter()
        model.generate(q, passages, mode="none" if label == "none" else "diekae", max_new_tokens=1)
        return time.perf_counter() - t

    labels = ("none", "precomputed", "store")
    with torch.inference_mode():
        times = {label: [] for label in labels}
        for i in range(8):
            for label in labels:
                t = call(label)
                if i:
                    times[label].append(t)
        med = {label: statistics.median(ts) * 1000 for label, ts in times.items()}
        out.write("time to first token (median of 7, modes taking turns): " + ", ".join(
            f"{label} {ms:.1f} ms ({ms / med['none']:.2f}x none)" for label, ms in med.items()) + "\n")
        cache = model.knowledge.passage_cache
        misses, stored = cache.misses, cache.stored
        call("store")
        out.write(f"one call from the store: {cache.stored - stored} segments read from it, "
                  f"{cache.misses - misses} encoded in the call\n\n")

        prof = cProfile.Profile()
        for _ in range(args.calls):
            model.answer_reader.clear()
            embedder.forget_queries()
            embedder.encode_queries([q])
            model.knowledge.attach_store(None, model.encoder)
            prof.enable()
            model.generate(q, passages, max_new_tokens=1)
            prof.disable()
        stats = io.StringIO()
        pstats.Stats(prof, stream=stats).sort_stats("cumulative").print_stats("diekae_rag|modeling_bert|modeling_llama.py:4", 45)
        out.write(f"cProfile of {args.calls} precomputed calls (cumtime is the total over them):\n{stats.getvalue()}\n")
        if args.ops:
            out.write(knowledge_ops(model, q, passages, args.calls))

    new = [f.passage for f in make_facts(args.k, seed=501, relations="all", other_facts=(12, 12))]
    classes, tokenizer = model.knowledge.classes, model.knowledge.passage_tokens.tokenizer
    t = time.perf_counter()
    records = {p: PassageTokens(tokenizer).record(p, classes) for p in new}
    made = time.perf_counter() - t
    store.add({}, tokens=records)
    reading = PassageTokens(tokenizer)
    reading.stored = store.passage_tokens
    t = time.perf_counter()
    reading.fetch(new, classes)
    read = time.perf_counter() - t
    n_tok = sum(len(r.ids) for r in records.values())
    out.write(f"the copy's token records of {args.k} new passages ({n_tok} tokens): made by tokenising "
              f"{made * 1000:.1f} ms, read from the store {read * 1000:.1f} ms\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), out.getvalue())
    print(out.getvalue())


def knowledge_ops(model: DiekaeModel, q: str, passages: list[str], calls: int) -> str:
    """The gate and the encoders' session of precomputed calls, timed (medians) and op by op."""
    from torch.profiler import ProfilerActivity, profile

    copy, knowledge = model.copy, model.knowledge
    knowledge.attach_store(None, model.encoder)
    prompts, held = model.prepare([q], [passages], "diekae")
    mask = model.prompter.pad(prompts, model.device, side="left")[1]

    def gate() -> list[float]:
        model.answer_reader.clear()
        return knowledge.gate(prompts, held, copy)

    def session(strengths: list[float]) -> None:
        knowledge.session(model.encoder, prompts, held, mask, None, strengths, copy, knowledge.providers(copy))

    times = {"gate": [], "session": []}
    for _ in range(calls):
        t = time.perf_counter()
        strengths = gate()
        t1 = time.perf_counter()
        session(strengths)
        times["gate"].append(t1 - t)
        times["session"].append(time.perf_counter() - t1)
    text = "the gate and the encoders' session alone, medians of {}: {}\n\n".format(calls, ", ".join(
        f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in times.items()))
    for label, run in (("gate", gate), ("session", lambda: session(strengths))):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                run()
        table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20)
        text += f"torch.profiler, the {label} of {calls} calls (totals over them):\n{table}\n\n"
    return text


if __name__ == "__main__":
    main()
