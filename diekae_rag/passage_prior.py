"""Passage prior: which retrieved passage the question is about, from the retriever's own embedder.

The pointer readout's keys are computed from each passage alone (so passages can be encoded
once and cached), which means they cannot know the question; with several passages the copy
attention spreads over all of them. The prior adds to every knowledge token's pointer score
``strength * (cos(question, its passage) - max_j cos(question, passage_j))``: 0 for the passage
nearest the question, negative for the others. It is ``log softmax(cos / T)`` shifted so the best
passage gets 0, with ``strength = 1 / T``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class PassagePrior:
    """Per-passage log priors for a question, from sentence-embedding cosine similarity."""

    def __init__(self, strength: float, embedder=None) -> None:
        if not strength > 0:
            raise ValueError(f"PassagePrior strength must be positive, got {strength!r}; use no prior instead.")
        self.strength = float(strength)
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            from diekae_rag.retrievers.embeddings import Embedder
            self._embedder = Embedder()
        return self._embedder

    def __call__(self, questions: Sequence[str], passages: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each question, one log prior per passage (0 for the nearest; [] without passages)."""
        flat = [p for ps in passages for p in ps]
        if not flat:
            return [[] for _ in questions]
        asked = [q for q, ps in zip(questions, passages) if len(ps) > 1]
        qv = dict(zip(asked, self.embedder.encode(asked))) if asked else {}
        pv = self.embedder.encode(flat) if asked else None
        out, i = [], 0
        for q, ps in zip(questions, passages):
            if len(ps) <= 1:  # one passage: nothing to choose between
                out.append([0.0] * len(ps))
            else:
                cos = pv[i: i + len(ps)] @ qv[q]
                out.append([float(x) for x in self.strength * (cos - cos.max())])
            i += len(ps)
        return out


def segment_bias(priors: Optional[Sequence[float]], segment_lengths: Sequence[int]) -> np.ndarray:
    """Per-token bias for an isolated item's segments (prefix first, then one per passage)."""
    if priors is None:
        return np.zeros(sum(segment_lengths), dtype=np.float32)
    if len(priors) != len(segment_lengths) - 1:
        raise ValueError(f"{len(priors)} passage priors for {len(segment_lengths) - 1} passages.")
    return np.repeat(np.asarray([0.0, *priors], dtype=np.float32), segment_lengths)
