"""The copy gate: do the passages answer the question at all?

The copy readout writes a span from whatever passages arrive, so passages that do not answer
(the corpus lacks the fact, or the question is general knowledge) would override what the
decoder knows. The gate reads the question against the passages and, where it closes, the item
gets no knowledge at all: the decoder sees exactly what it sees with ``mode="none"`` (every copy
term, and the per-step rows, are scaled by 0). Two signals, each off until its threshold is set:

- ``CopyConfig.gate_cosine``: the retriever's own MiniLM cosine between the question and its
  nearest passage. It separates off-topic retrievals; it cannot see a same-topic passage that
  lacks the answer.
- ``CopyConfig.gate_no_answer``: the answer-start reader's probability of "no answer here", from
  its normalisation over every passage's word-pieces and a [CLS] slot per window it reads
  (``CopyConfig.gate_nulls="every"``; ``"max"``: the most confident window's slot alone). With
  ``CopyConfig.gate_ramp`` the gate half-opens just below that threshold: what the encoders write
  is scaled by a strength between 0 and 1 (:meth:`CopyConfig.gate_strength`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .config import CopyConfig
from .providers import PassagePrior


def gate_strengths(questions: Sequence[str], passages: Sequence[Sequence[str]], copy: CopyConfig,
                   prior: Optional[PassagePrior], reader) -> list[float]:
    """For each (question, passages): how far the gate lets the passages through, 1.0 (open) to 0.0
    (closed: the item gets no knowledge); items without passages, or with the gate off, get 1.0."""
    strength = [1.0] * len(questions)
    if copy.gate_cosine > 0:
        if prior is None:
            raise ValueError("CopyConfig.gate_cosine needs the passage embedder (model.passage_prior); "
                             "assign one, or set gate_cosine to 0.")
        best = prior.cosines(questions, passages)
        strength = [s if not len(c) or float(c.max()) >= copy.gate_cosine else 0.0 for s, c in zip(strength, best)]
    if copy.gate_no_answer < 1:
        if reader is None:
            raise ValueError("CopyConfig.gate_no_answer needs an answer-start reader; assign model.answer_reader, "
                             "or set gate_no_answer to 1.")
        limit = math.log(copy.gate_no_answer)
        for i, (q, ps) in enumerate(zip(questions, passages)):
            if strength[i] and ps:
                log_p = reader.no_answer_log_prob(q, list(ps), copy.gate_nulls)  # the threshold compared in log space
                if log_p > limit:
                    strength[i] = 0.0
                elif copy.gate_ramp:
                    strength[i] = copy.gate_strength(math.exp(log_p))
    return strength

