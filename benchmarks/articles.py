"""The cost of real retrieval: whole articles in a store, new questions, the store's top-k chunks.

``benchmarks/data/articles.json`` holds four whole SQuAD v1.1 dev articles (its canary kept). They are
written out as one ``.txt`` file each and indexed with ``open_or_build(folder, store_dir, model=model)``,
so their chunks and passage states are stored. Then a new Python process opens the store, warms the
model up and, at each k, asks new questions from those articles over the store's top-k chunks (chunks
on the question's own topic, as a retriever returns them). For each question the modes take turns
(their order rotating), with the in-memory caches cleared before each call, so DIEKÆ reads every
chunk's states from the store and its reader reads the question anew. Only ``generate(...,
max_new_tokens=1)`` is timed: retrieval (which embeds the question) runs before it, untimed, for
every mode.

A fourth mode, ``diekae_reader_kept``, is DIEKÆ with the answer-start reader's reading taken out: the
reader reads the question and chunks before the timed call (untimed) and keeps its answer, while the
passage states and the prior's vectors are forgotten as for ``diekae``. It is what the decoder side
costs (the encoders over the question, the states read from the store, the copy readout and the
decoder's prefill with the injection), the part a cheaper reader cannot remove.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

ARTICLES = Path(__file__).parent / "data" / "articles.json"
MODES = ("none", "in_context", "diekae", "diekae_reader_kept")

_ASK = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[5])
from articles import forget_kept
from diekae_rag import DiekaeModel
from diekae_rag.retrievers import PassageStore
from diekae_rag.state_store import states_folder
from diekae_rag.indexing import attach_states, warm_up
model = DiekaeModel.from_pretrained(sys.argv[4] or None)
store = PassageStore.load(sys.argv[1])
attach_states(model, states_folder(sys.argv[1]))
warm_up(model)
plan = json.loads(sys.argv[2])
out = {}
for k in plan["ks"]:
    times = {m: [] for m in plan["modes"]}
    for i, q in enumerate(plan["questions"][str(k)]):
        store.embedder.forget_queries()
        passages = [p.text for p in store.search(q, k)]  # retrieval embeds the question; the prior and gate reuse it
        modes = plan["modes"][i % len(plan["modes"]):] + plan["modes"][:i % len(plan["modes"])]
        for m in modes:
            forget_kept(model)
            if m == "diekae_reader_kept":  # the reader reads now, untimed, and keeps its answer
                model.gate([q], [passages])
                forget_kept(model, reader=False)
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(q, passages, mode=m.replace("_reader_kept", ""), max_new_tokens=1)
            if i:  # the first question at each k warms up
                times[m].append(time.perf_counter() - t)
    out[str(k)] = times
print(json.dumps(out))
"""


def forget_kept(model, reader: bool = True) -> None:
    """Forget what the last call kept in memory (passage states, the prior's vectors and, with
    ``reader``, the reader's answers and passage sides), so that the next call reads states from the
    store and its question anew."""
    model.knowledge.passage_cache.clear()
    if reader and model.answer_reader is not None:
        model.answer_reader.clear(passages=True)
    if model.passage_prior is not None and hasattr(model.passage_prior, "clear"):
        model.passage_prior.clear()


def load_articles(path: Path = ARTICLES) -> list[dict]:
    """The articles: [{"title", "paragraphs": [{"context", "qas": [{"question", "answers"}]}]}]."""
    return json.loads(path.read_text(encoding="utf-8"))["data"]


def questions_for(ks, n: int, articles: list[dict]) -> dict[str, list[str]]:
    """``n + 1`` distinct questions per k (the first warms up), spread over the articles, none asked twice."""
    every = [qa["question"] for a in articles for p in a["paragraphs"] for qa in p["qas"]]
    step = max(len(every) // ((n + 1) * len(ks)), 1)
    picked = every[::step]
    if len(picked) < (n + 1) * len(ks):
        raise ValueError(f"The articles hold {len(every)} questions; {n + 1} a k at {len(ks)} ks need more.")
    return {str(k): picked[i * (n + 1): (i + 1) * (n + 1)] for i, k in enumerate(ks)}


def bench_articles(model, checkpoint: Optional[str], ks=(1, 5, 10, 20), n: int = 15,
                   states_dtype: Optional[str] = None) -> dict:
    """Time to the first token per mode and k over real retrieval (the module docstring): medians,
    ratios, and the store's size (chunks, knowledge tokens, bytes of stored states per chunk and per
    knowledge token)."""
    from diekae_rag.retrievers import open_or_build
    from diekae_rag.state_store import states_folder
    articles = load_articles()
    attached = model.knowledge.state_store
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for a in articles:
            (docs / f"{a['title']}.txt").write_text("\n\n".join(p["context"] for p in a["paragraphs"]), encoding="utf-8")
        store = open_or_build(docs, Path(tmp) / "store", model=model, progress=False, states_dtype=states_dtype)
        states = model.knowledge.state_store
        size = {"chunks": len(store), "knowledge_tokens": states.knowledge_tokens(), "state_bytes": states.bytes,
                "states_dtype": states.dtype}
        model.knowledge.attach_store(attached, model.encoder)
        plan = {"ks": list(ks), "modes": list(MODES), "questions": questions_for(ks, n, articles)}
        run = subprocess.run([sys.executable, "-c", _ASK, str(Path(tmp) / "store"), json.dumps(plan),
                              str(torch.get_num_threads()), checkpoint or "", str(Path(__file__).parent)],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"The articles benchmark's process failed:\n{run.stderr[-3000:]}")
        times = json.loads(run.stdout.strip().splitlines()[-1])
    size["bytes_per_chunk"] = size["state_bytes"] / size["chunks"]
    size["bytes_per_knowledge_token"] = size["state_bytes"] / max(size["knowledge_tokens"], 1)
    rows = []
    for k in ks:
        med = {m: statistics.median(times[str(k)][m]) for m in MODES}
        rows.append({"k": k, **{f"{m}_ttft_s": med[m] for m in MODES},
                     "diekae/none": med["diekae"] / med["none"], "diekae/in_context": med["diekae"] / med["in_context"],
                     "diekae_reader_kept/none": med["diekae_reader_kept"] / med["none"],
                     "questions": n, "times": times[str(k)]})
        print(f"articles k={k:2d}: none {med['none'] * 1000:6.0f} ms  in-context {med['in_context'] * 1000:6.0f} ms  "
              f"DIEKÆ {med['diekae'] * 1000:6.0f} ms  ({rows[-1]['diekae/none']:.2f}× bare, "
              f"{rows[-1]['diekae/in_context']:.2f}× in-context); reader's answer kept "
              f"{med['diekae_reader_kept'] * 1000:6.0f} ms ({rows[-1]['diekae_reader_kept/none']:.2f}× bare)", flush=True)
    print(f"store: {size['chunks']} chunks, {size['bytes_per_chunk'] / 1024:.0f} KB of states a chunk, "
          f"{size['bytes_per_knowledge_token'] / 1024:.1f} KB a knowledge token ({size['states_dtype']})", flush=True)
    return {"store": size, "rows": rows}


LABELS = {"none": "bare decoder", "in_context": "in-context RAG", "diekae": "DIEKÆ",
          "diekae_reader_kept": "DIEKÆ without the reader's reading"}


def plot_articles(result: dict, path: Path) -> None:
    """Time to the first token against k per mode (log scale) and DIEKÆ's ratio to the bare decoder,
    from :func:`bench_articles`' result, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    ks = [r["k"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for m in MODES:
        left.plot(ks, [r[f"{m}_ttft_s"] * 1000 for r in rows], marker="o", label=LABELS[m])
    left.set_yscale("log")
    left.set_ylabel("time to the first token (ms)")
    left.legend(fontsize=8)
    for key, label in (("diekae/none", "DIEKÆ"), ("diekae_reader_kept/none", LABELS["diekae_reader_kept"])):
        right.plot(ks, [r[key] for r in rows], marker="o", label=label)
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("× the bare decoder")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel(f"top-k chunks of {result['store']['chunks']} (4 articles, stored {result['store']['states_dtype']} states)")
        ax.set_xticks(ks)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
