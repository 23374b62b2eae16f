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
  its joint normalisation over every passage's word-pieces and one [CLS] slot.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .config import CopyConfig
from .providers import PassagePrior


def gate_open(questions: Sequence[str], passages: Sequence[Sequence[str]], copy: CopyConfig,
              prior: Optional[PassagePrior], reader) -> list[bool]:
    """For each (question, passages): whether the gate lets the passages through (items without
    passages, or with the gate off, are open)."""
    open_ = [True] * len(questions)
    if copy.gate_cosine > 0:
        if prior is None:
            raise ValueError("CopyConfig.gate_cosine needs the passage embedder (model.passage_prior); "
                             "assign one, or set gate_cosine to 0.")
        best = prior.cosines(questions, passages)
        open_ = [o and (not len(c) or float(c.max()) >= copy.gate_cosine) for o, c in zip(open_, best)]
    if copy.gate_no_answer < 1:
        if reader is None:
            raise ValueError("CopyConfig.gate_no_answer needs an answer-start reader; assign model.answer_reader, "
                             "or set gate_no_answer to 1.")
        limit = math.log(copy.gate_no_answer)
        open_ = [o and (not ps or reader.no_answer_log_prob(q, list(ps)) <= limit)
                 for o, q, ps in zip(open_, questions, passages)]
    return open_
