"""Passage prior: which retrieved passage the question is about, from the retriever's own embedder.

The pointer readout's keys are computed from each passage alone (so passages can be encoded
once and cached), which means they cannot know the question; with several passages the copy
attention spreads over all of them. The prior adds to every knowledge token's pointer score
``strength * (cos(question, its passage) - max_j cos(question, passage_j))``: 0 for the passage
nearest the question, negative for the others. It is ``log softmax(cos / T)`` shifted so the best
passage gets 0, with ``strength = 1 / T``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .lru import LRU


class PassagePrior:
    """Per-passage log priors for a question, from sentence-embedding cosine similarity.

    ``embedder``: anything with ``encode(texts) -> (n, dim)`` unit vectors (default: the
    retriever's MiniLM, loaded on first use and shared with it)."""

    def __init__(self, strength: float, embedder=None, max_cached: int = 4096) -> None:
        if not strength > 0:
            raise ValueError(f"PassagePrior strength must be positive, got {strength!r}; use no prior instead.")
        self.strength = float(strength)
        self._embedder = embedder
        self.max_cached = max_cached
        self._vectors = LRU(max_cached)  # passage text -> unit vector

    @property
    def embedder(self):
        if self._embedder is None:
            from diekae_rag.retrievers.embeddings import Embedder
            self._embedder = Embedder()
        return self._embedder

    def __call__(self, questions: Sequence[str], passages: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each question, one log prior per passage (0 for the nearest; [] without passages)."""
        multi = [(q, ps) for q, ps in zip(questions, passages) if len(ps) > 1]  # one passage: no choice
        qv = dict(zip([q for q, _ in multi], self.embedder.encode([q for q, _ in multi]))) if multi else {}
        pv = self.passage_vectors([p for _, ps in multi for p in ps]) if multi else {}
        out = []
        for q, ps in zip(questions, passages):
            if len(ps) > 1:
                cos = np.stack([pv[p] for p in ps]) @ qv[q]
                out.append([float(x) for x in self.strength * (cos - cos.max())])
            else:
                out.append([0.0] * len(ps))
        return out

    def passage_vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Unit vectors of ``texts``, embedding only those not in the cache (e.g. at index time)."""
        found = self._vectors.get_many(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            new = self.embedder.encode(todo)
            found.update(zip(todo, new))
            self._vectors.put_many(zip(todo, new))
        return found

    def clear(self) -> None:
        self._vectors.clear()


def segment_bias(priors: Sequence[float], segment_lengths: Sequence[int]) -> np.ndarray:
    """Per-token bias for an isolated item's segments (prefix first, then one per passage)."""
    if len(priors) != len(segment_lengths) - 1:
        raise ValueError(f"{len(priors)} passage priors for {len(segment_lengths) - 1} passages.")
    return np.repeat(np.asarray([0.0, *priors], dtype=np.float32), segment_lengths)
