"""Distractor passages the way a RAG app meets them: the retriever's other hits for the question.

``retrieved_distractors`` embeds the questions and a passage pool with the product's own
embedder (all-MiniLM-L6-v2) and searches a FAISS inner-product index, so each item's
distractors are the pool passages closest to its question, the gold passage left out. Mining
is the slow part (about 160 passages/s on 2 CPU cores), so the result is cached on disk as
``.npy`` indices keyed by a hash of the inputs; a machine without FAISS or the embedder (a
rented GPU) can reuse a cache file computed elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_write


def _cache_dir() -> Path:
    from ..defaults import cache_dir
    return Path(os.environ.get("DIEKAE_RAG_DISTRACTOR_CACHE") or cache_dir() / "distractors")


def cache_key(questions: Sequence[str], golds: Sequence[str], pool: Sequence[str], n: int) -> str:
    h = hashlib.sha256(json.dumps([list(questions), list(golds), list(pool), n, "all-MiniLM-L6-v2/flat-ip/1"]
                                  ).encode("utf-8"))
    return h.hexdigest()[:20]


def mine(questions: Sequence[str], golds: Sequence[str], pool: Sequence[str], n: int,
         progress: bool = True) -> np.ndarray:
    """(len(questions), n) indices into ``pool``: the nearest passages to each question, gold excluded."""
    from ..retrievers import Embedder
    from ..retrievers.store import build_index

    if len(set(pool)) < n + 1:
        raise ValueError(f"The distractor pool has {len(set(pool))} distinct passages; {n} distractors "
                         f"per item need at least {n + 1}.")
    emb = Embedder()
    index = build_index(emb.encode(list(pool), progress=progress), "flat")
    qv = emb.encode(list(questions), progress=progress)
    _, hits = index.search(qv, min(len(pool), 2 * n + 8))
    out = np.full((len(questions), n), -1, dtype=np.int64)
    for i, (row, gold) in enumerate(zip(hits, golds)):
        chosen: list[int] = []
        for j in row:
            if j >= 0 and pool[j] != gold and pool[j] not in (pool[c] for c in chosen):
                chosen.append(int(j))
            if len(chosen) == n:
                break
        if len(chosen) < n:  # a question whose hits are mostly copies of its gold: fall back to a scan
            chosen += [j for j in range(len(pool)) if pool[j] != gold and j not in chosen][: n - len(chosen)]
        out[i] = chosen
    return out


def _save(path: Path, idx: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file handle: np.save would add ".npy" to the temp name
        np.save(fh, idx, allow_pickle=False)


def retrieved_distractors(questions: Sequence[str], golds: Sequence[str], pool: Sequence[str], n: int,
                          cache: Optional[Path] = None) -> list[list[str]]:
    """For each question, its ``n`` nearest pool passages other than its gold passage, nearest first."""
    if len(questions) != len(golds):
        raise ValueError(f"{len(questions)} questions but {len(golds)} gold passages.")
    path = (cache or _cache_dir()) / f"{cache_key(questions, golds, pool, n)}.npy"
    if path.exists():
        idx = np.load(path, allow_pickle=False)
    else:
        idx = mine(questions, golds, pool, n)
        atomic_write(path, lambda tmp: _save(tmp, idx))
    if idx.shape != (len(questions), n):
        raise ValueError(f"Distractor cache {path} has shape {idx.shape}, expected {(len(questions), n)}; "
                         "delete it to mine again.")
    return [[pool[j] for j in row] for row in idx.tolist()]
