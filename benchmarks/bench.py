"""The benchmark helpers behind ``python benchmarks/run.py`` and the other scripts here.

The default workload is real retrieval (`articles.py`): whole articles in a store, new questions
over its top-k chunks, in a fresh process. Then, in one process, on the same question and
passages, for none / in_context / diekae at k = 1, 3, 5, 10 passages of about 120 tokens: time
to first token, latency for 32 new tokens, decode-step time, tokens the decoder reads and peak
memory; medians over repeats. Also
training cost (phase 1 with cached Δ vs recomputing the teacher; peak memory of phases 1 and 2),
batch throughput and FAISS retrieval at 10k / 100k chunks. Writes JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.fictional import make_facts
from diekae_rag.data.mixture import Example
from diekae_rag.indexing import index_states
from diekae_rag.model import DiekaeModel

MODES = ("none", "in_context", "diekae")


class PeakMemory:
    """Peak extra memory during a block: CUDA max_memory_allocated, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self._stop = False
            self._max = self.base

            def sample() -> None:
                while not self._stop:
                    self._max = max(self._max, self._rss())
                    time.sleep(0.0005)
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, setup: Optional[Callable[[], object]] = None) -> float:
    """Seconds one call of ``fn`` takes, with the device synchronised before and after (``setup``
    runs first, untimed)."""
    if setup is not None:
        setup()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int, device: torch.device,
                setup: Optional[Callable[[], object]] = None, warm_ups: int = 1) -> float:
    """Median seconds of ``repeats`` timed calls of ``fn``, after ``warm_ups`` untimed ones."""
    for _ in range(warm_ups):
        timed(fn, device, setup)
    return statistics.median(timed(fn, device, setup) for _ in range(repeats))


def bench_passages(model: DiekaeModel, k: int, tokens: int = 120, seed: int = 0) -> tuple[str, list[str]]:
    """A question and ``k`` fictional passages of about ``tokens`` decoder tokens each."""
    facts = make_facts(k, seed=seed, relations="all", other_facts=(12, 12))
    passages = []
    for f in facts:
        words = f.passage.split(" ")
        while len(model.prompter.ids(" ".join(words))) > tokens:
            words = words[:-1]
        passages.append(" ".join(words))
    return facts[0].question, passages


def _mode(label: str) -> str:
    """The generate mode of a latency row ("diekae_store" and "diekae_cold" are "diekae")."""
    return "diekae" if label.startswith("diekae") else label


def bench_latency(model: DiekaeModel, ks=(1, 3, 5, 10), new_tokens: int = 32, repeats: int = 5) -> list[dict]:
    rows = []
    dev = model.device
    # With passage isolation, "diekae" has its passages precomputed (as at index time: encoder
    # states and, with the passage prior, embeddings) and "diekae_cold" encodes them inside the
    # timed call; "diekae_store" reads their states from a PassageStateStore on disk (float16,
    # memory-mapped) with the memory cache and the prior's passage vectors cleared before each call.
    # No timed call includes retrieval; the retriever's question vector, which the passage prior and
    # the gate reuse (Embedder.encode_queries), is made before each DIEKÆ call, untimed, and what
    # it costs is recorded beside the rows ("question_embedding_s").
    modes = MODES + (("diekae_cold", "diekae_store") if model.config.passage_isolation else ())
    tmp = tempfile.TemporaryDirectory()
    stored = model.knowledge.state_store
    reader = model.knowledge.separate_reader(model.copy)

    def use_store(store) -> None:  # states, the prior's passage vectors and the reader's passage sides from disk, or not
        model.knowledge.attach_store(store, model.encoder)
    embedder = getattr(model.passage_prior, "embedder", None)
    embedder = embedder if hasattr(embedder, "encode_queries") else None
    for k in ks:
        q, passages = bench_passages(model, k)
        if "diekae_store" in modes:
            stored = index_states(model, passages, Path(tmp.name) / "states", progress=False)

        def setup(label: str) -> None:  # untimed: forget what the last call kept, then retrieve
            mode = _mode(label)
            if mode == "diekae" and model.answer_reader is not None:
                model.answer_reader.clear()  # the reader reads each new question: never a kept answer
            if label in ("diekae_cold", "diekae_store"):
                model.knowledge.passage_cache.clear()
                if reader is not None:
                    reader.clear(passages=True)
                if model.passage_prior is not None:
                    model.passage_prior.clear()
            use_store(stored if label == "diekae_store" else None)
            if embedder is not None:
                embedder.forget_queries()
                if mode != "none":  # retrieval embeds the question, and the prior and the gate reuse it
                    embedder.encode_queries([q])

        def run(label: str, n_new: int) -> None:
            kw = {"min_new_tokens": n_new} if n_new > 1 else {}
            model.generate(q, passages, mode=_mode(label), max_new_tokens=n_new, **kw)

        def medians(n_new: int, n: int) -> dict[str, float]:
            """Each mode's median time, the modes taking turns so that a CPU whose speed drifts
            during the run slows them alike."""
            times: dict[str, list[float]] = {label: [] for label in modes}
            for i in range(n + 1):  # the first round warms up
                for label in modes:
                    t = timed(lambda: run(label, n_new), dev, lambda: setup(label))
                    if i:
                        times[label].append(t)
            return {label: statistics.median(ts) for label, ts in times.items()}

        ttfts, totals = medians(1, repeats), medians(new_tokens, max(1, repeats // 2))
        for label in modes:
            prompt_len = len(model.prepare([q], [passages], _mode(label))[0][0])
            setup(label)
            with PeakMemory(dev) as mem:
                run(label, new_tokens)
            extra = {}
            if embedder is not None and label == "diekae":
                extra["question_embedding_s"] = median_time(lambda: embedder.encode([q]), repeats, dev)
            ttft, total = ttfts[label], totals[label]
            rows.append({"k": k, "mode": label, "ttft_s": ttft, "total_s": total, **extra,
                         "decode_step_s": (total - ttft) / (new_tokens - 1), "decoder_tokens": prompt_len,
                         "knowledge_tokens": sum(len(model.prompter.ids(p)) for p in passages),
                         "peak_mem_mb": mem.peak / 2**20})
            use_store(stored)
            print(f"k={k:2d} {label:12s} ttft {ttft * 1000:7.1f} ms  total {total:6.2f} s  "
                  f"decoder tokens {prompt_len:5d}  peak {mem.peak / 2**20:7.1f} MB", flush=True)
    return rows


_FRESH = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[3]))
from diekae_rag import DiekaeModel
from diekae_rag.retrievers import PassageStore
from diekae_rag.state_store import states_folder
from diekae_rag.indexing import attach_states, warm_up
model = DiekaeModel.from_pretrained(sys.argv[4] or None)
store = PassageStore.load(sys.argv[1])
attach_states(model, states_folder(sys.argv[1]))
loaded = time.perf_counter() - t0
warm_up(model)
warmed = time.perf_counter() - t0
asked = json.loads(sys.argv[2])
store.embedder.encode_queries([asked["question"]])  # what retrieval does before the call
first = []
for _ in range(2):
    if model.answer_reader is not None:
        model.answer_reader.clear()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(asked["question"], asked["passages"], max_new_tokens=1)
    first.append(time.perf_counter() - t)
times = []
for q in asked["retrieved"]:
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(q, [p.text for p in store.search(q, 5)], max_new_tokens=1)
    times.append(time.perf_counter() - t)
print(json.dumps({"load_s": loaded, "warm_up_s": warmed - loaded, "first_query_s": first[0], "second_query_s": first[1],
                  "retrieved_queries_s": times,
                  "segments_read_from_store": model.knowledge.passage_cache.stored,
                  "segments_encoded": model.knowledge.passage_cache.misses}))
"""


def bench_fresh_process(model: DiekaeModel, checkpoint: Optional[str], k: int = 5, n_docs: int = 40,
                        runs: int = 3) -> dict:
    """A new Python process opens a persisted store (FAISS index and passage states) and warms the
    model up (``warm_up(model)``). Its first query is the latency rows' question over their ``k``
    passages, which the store holds (time to first token, the question vector made before the call
    as retrieval makes it: compare with the ``diekae`` row at ``k``); then the same again, and
    questions answered over the ``k`` chunks retrieved from the store (retrieval included). ``runs``
    processes, one after another: the medians, and each process's figures under ``"runs"``."""
    from diekae_rag.retrievers import open_or_build
    from diekae_rag.state_store import states_folder
    facts = make_facts(n_docs, seed=7, relations="all", other_facts=(6, 6))
    q, passages = bench_passages(model, k)
    attached = model.knowledge.state_store
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for i, f in enumerate(facts):
            (docs / f"{i}.md").write_text(f.passage)
        store = open_or_build(docs, Path(tmp) / "store", model=model, progress=False)
        index_states(model, passages, states_folder(Path(tmp) / "store"), progress=False)
        model.knowledge.attach_store(attached, model.encoder)  # not the store that is about to go
        asked = {"question": q, "passages": passages, "retrieved": [f.question for f in facts[:4]]}
        each = []
        for _ in range(runs):
            out = subprocess.run([sys.executable, "-c", _FRESH, str(Path(tmp) / "store"), json.dumps(asked),
                                  str(torch.get_num_threads()), checkpoint or ""],
                                 capture_output=True, text=True, check=True)
            each.append(json.loads(out.stdout.strip().splitlines()[-1]))
    row = {key: statistics.median(r[key] for r in each) for key in ("load_s", "warm_up_s", "first_query_s", "second_query_s")}
    row.update({"retrieved_queries_s": [statistics.median(ts) for ts in zip(*(r["retrieved_queries_s"] for r in each))],
                "k": k, "chunks": len(store), "runs": each})
    print(f"fresh process (median of {runs}): load {row['load_s']:.2f} s, warm-up {row['warm_up_s']:.2f} s, first query "
          f"{row['first_query_s'] * 1000:.0f} ms, second {row['second_query_s'] * 1000:.0f} ms, retrieved "
          f"{[round(t * 1000) for t in row['retrieved_queries_s']]} ms", flush=True)
    return row


def ratios(rows: list[dict]) -> dict:
    out = {}
    for k in sorted({r["k"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["k"] == k}
        pairs = [(a, b) for a in ("diekae", "diekae_cold", "diekae_store") for b in ("in_context", "none")
                 if a in by and b in by]
        out[f"k={k}"] = {f"{m}_{a}/{b}": by[a][m] / by[b][m] for m in ("ttft_s", "total_s", "decode_step_s", "peak_mem_mb")
                         for a, b in pairs if by[b][m] > 0}
    return out


def bench_batch(model: DiekaeModel, sizes=(1, 8), new_tokens: int = 16) -> list[dict]:
    out = []
    q, passages = bench_passages(model, 5)
    for bs in sizes:
        for mode in MODES:
            t = median_time(lambda: model.generate_batch([q] * bs, [passages] * bs, mode=mode,
                                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                            2, model.device)
            out.append({"batch": bs, "mode": mode, "answers_per_s": bs / t, "tokens_per_s": bs * new_tokens / t})
    return out


def bench_training(model: DiekaeModel, batch_size: int = 16) -> dict:
    """Phase 1 per batch: cached Δ (encoder only) vs recomputing the teacher; peak memory of phases 1 and 2.

    Phase 1 trains the joint (non-isolated) layout, so isolation is switched off while this runs.
    """
    isolated = model.config.passage_isolation
    model.config.passage_isolation = False
    try:
        return _bench_training(model, batch_size)
    finally:
        model.config.passage_isolation = isolated


def _bench_training(model: DiekaeModel, batch_size: int) -> dict:
    from diekae_rag.training.phase1 import difference_loss, teacher_deltas
    from diekae_rag.training.phase2 import lm_loss
    from diekae_rag.training.trainer import autocast_for
    facts = make_facts(batch_size, seed=3, other_facts=(2, 2))
    batch = [Example(f.question, [f.passage], f.answer, f.distractor) for f in facts]
    enc = model.encoder
    enc.float().train()
    deltas = teacher_deltas(model, batch)

    amp = autocast_for(model.device)  # as in training

    def cached_step():
        with amp:
            loss = difference_loss(model, batch, deltas)
        loss.backward()

    def recompute_step():
        with amp:
            loss = difference_loss(model, batch, teacher_deltas(model, batch))
        loss.backward()

    def phase2_step():
        with amp:
            loss = lm_loss(model, batch)
        loss.backward()

    dev = model.device
    t_cached = median_time(cached_step, 3, dev)
    t_recompute = median_time(recompute_step, 3, dev)
    t_p2 = median_time(phase2_step, 2, dev)
    with PeakMemory(dev) as m1:
        cached_step()
    with PeakMemory(dev) as m2:
        phase2_step()
    enc.zero_grad(set_to_none=True)
    enc.eval()
    return {"batch_size": batch_size, "phase1_cached_s": t_cached, "phase1_recompute_s": t_recompute,
            "phase1_speedup": t_recompute / t_cached, "phase2_step_s": t_p2,
            "phase1_peak_mb": m1.peak / 2**20, "phase2_peak_mb": m2.peak / 2**20}


def bench_retrieval(sizes=(10_000, 100_000), dim: int = 384, queries: int = 500) -> list[dict]:
    """FAISS build throughput and top-5 search latency on synthetic unit vectors."""
    from diekae_rag.retrievers.store import build_index
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        qs = x[rng.integers(0, n, queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
        for kind in ("flat", "hnsw"):
            t0 = time.perf_counter()
            index = build_index(x, kind)
            build = time.perf_counter() - t0
            lat = []
            for q in qs:
                t0 = time.perf_counter()
                index.search(q[None], 5)
                lat.append(time.perf_counter() - t0)
            lat_ms = np.array(lat) * 1000
            out.append({"chunks": n, "index": kind, "build_chunks_per_s": n / build,
                        "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))})
            print(f"faiss {kind:5s} n={n:7d} build {n / build:9.0f}/s  p50 {out[-1]['p50_ms']:.3f} ms  "
                  f"p99 {out[-1]['p99_ms']:.3f} ms", flush=True)
    return out


def bench_load(repeats: int = 2) -> dict:
    """Seconds for a fresh process to import diekae_rag and load the default model (cache warm)."""
    import subprocess
    import sys
    code = ("import time; t = time.perf_counter(); from diekae_rag import DiekaeModel; "
            "t1 = time.perf_counter(); DiekaeModel.from_pretrained(); t2 = time.perf_counter(); "
            "print(t1 - t, t2 - t1)")
    runs = [[float(x) for x in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split()[-2:]] for _ in range(repeats)]
    return {"load_s_median": statistics.median(a + b for a, b in runs),
            "import_s_median": statistics.median(a for a, _ in runs),
            "from_pretrained_s_median": statistics.median(b for _, b in runs), "runs": runs}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} threads"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (metric, label) in zip(axes, (("ttft_s", "time to first token (s)"), ("total_s", "latency, 32 tokens (s)"),
                                          ("peak_mem_mb", "peak extra memory (MB)"))):
        for mode in sorted({r["mode"] for r in rows}, key=lambda m: (MODES + ("diekae_cold", "diekae_store")).index(m)):
            pts = sorted((r["k"], r[metric]) for r in rows if r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_xlabel("passages k (≈120 tokens each)")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["articles", "latency", "fresh", "batch", "training", "retrieval", "load"])
    ap.add_argument("--article-ks", type=int, nargs="+", default=[1, 5, 10, 20],
                    help="k of the real-retrieval rows (benchmarks/articles.py)")
    ap.add_argument("--questions", type=int, default=15, help="timed questions a k in the real-retrieval rows")
    ap.add_argument("--states-dtype", default=None, choices=["float16", "float32", "int8", "int4"],
                    help="how the real-retrieval store keeps passage states (default: the store's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fresh-runs", type=int, default=3, help="new processes timed by the fresh-process row")
    ap.add_argument("--compiled", nargs="?", const="auto", default=None, metavar="MODE",
                    help="decode steps through torch.compile (DiekaeModel.compile_decode; MODE default: reduce-overhead "
                         "on CUDA, default on the CPU); each timing's untimed warm-up call compiles")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if args.compiled:
        model.compile_decode(None if args.compiled == "auto" else args.compiled)
    out = Path(args.out) / model.device.type
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if args.skip and (out / "bench.json").exists():  # a partial run updates the sections it ran
        res = json.loads((out / "bench.json").read_text())
    res.update({"hardware": hardware(model.device), "dtype": str(model.decoder.dtype),
                "encoder": model.config.to_dict(), "copy": model.copy.to_dict(), "torch": torch.__version__,
                "compiled_decode": model.decode_compile.mode if model.decode_compile is not None else None})

    def save() -> None:  # after every section, so that an interrupted run keeps what it measured
        atomic_write_text(out / "bench.json", json.dumps(res, indent=2))

    if "articles" not in args.skip:
        from articles import bench_articles, plot_articles
        res["articles"] = bench_articles(model, args.checkpoint, args.article_ks, args.questions,
                                         args.states_dtype)
        plot_articles(res["articles"], out / "articles.png")
        save()
    with torch.inference_mode():
        if "latency" not in args.skip:
            res["latency"] = bench_latency(model, args.ks, repeats=args.repeats)
            res["ratios"] = ratios(res["latency"])
            plot(res["latency"], out / "latency_memory.png")
            save()
        if "batch" not in args.skip:
            res["batch"] = bench_batch(model)
            save()
    if "fresh" not in args.skip and model.config.passage_isolation:
        res["fresh_process"] = bench_fresh_process(model, args.checkpoint, runs=args.fresh_runs)
        save()
    if "training" not in args.skip:
        res["training"] = bench_training(model)
        save()
    if "retrieval" not in args.skip:
        res["retrieval"] = bench_retrieval()
        save()
    if "load" not in args.skip:
        res["load"] = bench_load()
        save()
    print(json.dumps({k: res[k] for k in ("hardware", "ratios", "training", "load") if k in res}, indent=2))
    if "articles" in res:
        print(json.dumps({"articles": [{k: v for k, v in r.items() if k != "times"} for r in res["articles"]["rows"]],
                          "store": res["articles"]["store"]}, indent=2))
    return 0
