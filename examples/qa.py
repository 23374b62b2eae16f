"""Document QA over a folder: FAISS retrieval -> DIEKÆ encoders -> SmolLM2 answer, with sources.

    python examples/qa.py                               # interactive, over examples/docs
    python examples/qa.py "Who is Marsul married to?"   # one question
    python examples/qa.py --docs ~/notes --compare "..." # also the in-context answer and timings
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.defaults import cache_dir
from diekae_rag.retrievers import open_or_build

HERE = Path(__file__).resolve().parent


def default_store_dir(docs: Path) -> Path:
    key = hashlib.sha256(str(docs.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "stores" / f"{docs.resolve().name}-{key}"


def answer(model: DiekaeModel, store, question: str, k: int, compare: bool, max_new_tokens: int) -> None:
    t0 = time.perf_counter()
    passages = store.search(question, k)
    t_retrieve = time.perf_counter() - t0
    texts = [p.text for p in passages]
    t0 = time.perf_counter()
    text = model.generate(question, texts, mode="diekae", max_new_tokens=max_new_tokens)
    t_diekae = time.perf_counter() - t0
    print(f"\nQ: {question}\nA (DIEKÆ): {text}")
    print("Sources:")
    for p in passages:
        print(f"  [{p.score:.3f}] {p.doc_id} #{p.chunk_index}: {p.text[:80].replace(chr(10), ' ')}...")
    if compare:
        t0 = time.perf_counter()
        ctx = model.generate(question, texts, mode="in_context", max_new_tokens=max_new_tokens)
        t_ctx = time.perf_counter() - t0
        print(f"A (in-context RAG): {ctx}")
        print(f"Timings: retrieval {t_retrieve * 1000:.0f} ms | DIEKÆ {t_diekae:.2f} s | in-context {t_ctx:.2f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="*", help="the question (interactive when omitted)")
    ap.add_argument("--docs", type=Path, default=HERE / "docs", help="folder of .txt/.md/.pdf documents")
    ap.add_argument("--store", type=Path, default=None, help="where to keep the index (default: cache)")
    ap.add_argument("--k", type=int, default=3, help="passages to retrieve")
    ap.add_argument("--compare", action="store_true", help="also answer with in-context RAG, with timings")
    ap.add_argument("--checkpoint", default=None, help="encoder folder (default: the shipped encoders)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--compile", action="store_true",
                    help="compile the decode steps (torch.compile, static cache; the first answer waits for it)")
    args = ap.parse_args(argv)
    if not args.docs.is_dir():
        print(f"error: --docs {args.docs} is not a folder of documents", file=sys.stderr)
        return 2
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if args.compile:
        model.compile_decode()
    # Index time: chunks -> MiniLM -> FAISS, and each chunk's encoder states, stored beside the index;
    # queries then read the retrieved chunks' states and encode only the question.
    store = open_or_build(args.docs, args.store or default_store_dir(args.docs),
                          model=model if model.config.passage_isolation else None)
    if len(store) == 0:
        print(f"error: no readable .txt/.md/.pdf documents in {args.docs}", file=sys.stderr)
        return 2
    print(f"Index: {len(store)} chunks from {args.docs}")
    if args.question:
        answer(model, store, " ".join(args.question), args.k, args.compare, args.max_new_tokens)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            q = input("\nQuestion (empty to quit): ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not q or not q.strip():
            break
        answer(model, store, q.strip(), args.k, args.compare, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
