"""Where DIEKÆ's first token goes over real retrieval: a cProfile of ``--calls`` new questions over
the top-k chunks of the four articles of ``benchmarks/articles.py`` (states read from the store, the
memory caches cleared before each call, retrieval and its question vector made before, untimed).

    python research/articles_profile.py [--checkpoint DIR] [--k 5] [--states-dtype int4] [--out FILE]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from articles import forget_kept, load_articles, questions_for  # noqa: E402

from diekae_rag import DiekaeModel  # noqa: E402
from diekae_rag.atomic import atomic_write_text  # noqa: E402
from diekae_rag.indexing import warm_up  # noqa: E402
from diekae_rag.retrievers import open_or_build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--states-dtype", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/articles_profile.txt"))
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    articles = load_articles()
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for a in articles:
            (docs / f"{a['title']}.txt").write_text("\n\n".join(p["context"] for p in a["paragraphs"]), encoding="utf-8")
        store = open_or_build(docs, Path(tmp) / "store", model=model, progress=False, states_dtype=args.states_dtype)
        warm_up(model)
        prof, times = cProfile.Profile(), []
        for q in questions_for([args.k], args.calls, articles)[str(args.k)][1:]:
            store.embedder.forget_queries()
            passages = [p.text for p in store.search(q, args.k)]  # embeds the question, as retrieval does
            forget_kept(model)
            t = time.perf_counter()
            prof.enable()
            with torch.inference_mode():
                model.generate(q, passages, max_new_tokens=1)
            prof.disable()
            times.append(time.perf_counter() - t)
    text = io.StringIO()
    text.write(f"checkpoint {args.checkpoint or 'shipped'}, k={args.k}, states {args.states_dtype or 'float16'}, "
               f"{args.calls} calls: median {statistics.median(times) * 1000:.0f} ms to the first token\n\n")
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(r"diekae_rag|modeling_llama.py:427|_prefill", 40)
    atomic_write_text(args.out, text.getvalue())
    print(text.getvalue())


if __name__ == "__main__":
    main()
