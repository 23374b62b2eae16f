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
- ``CopyConfig.gate_given_answers``: in a conversation read with its earlier turns, the reader's
  "no answer" together with its starts on the answers those turns gave: a follow-up whose passages
  hold nothing but what was already said. Single-turn questions never read it.
- ``CopyConfig.gate_no_answer_turns``: a stricter "no answer" threshold for questions read with their
  earlier turns.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .config import READER_GATES, CopyConfig
from .providers import GivenAnswersSkipped, PassagePrior


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
    if not copy.reader_gated:
        return strength
    if reader is None:
        read = [name for name in READER_GATES if getattr(copy, name) < 1]
        raise ValueError(f"CopyConfig.{read[0]} needs an answer-start reader; assign model.answer_reader, "
                         f"or set {' and '.join(read)} to 1.")
    for i, (q, ps) in enumerate(zip(questions, passages)):
        if not (strength[i] and ps):
            continue
        turns = isinstance(reader, GivenAnswersSkipped) and bool(reader.given.get(q))
        threshold = min(copy.gate_no_answer, copy.gate_no_answer_turns) if turns else copy.gate_no_answer
        if turns and copy.gate_given_answers < 1 and \
                reader.given_or_no_answer_log_prob(q, list(ps), copy.gate_nulls) > math.log(copy.gate_given_answers):
            strength[i] = 0.0
        elif threshold < 1:
            log_p = reader.no_answer_log_prob(q, list(ps), copy.gate_nulls)  # the threshold compared in log space
            if log_p > math.log(threshold):
                strength[i] = 0.0
            elif copy.gate_no_answer >= 1:
                continue  # only the turns' threshold is set: it has no ramp
            elif copy.gate_ramp:
                strength[i] = copy.gate_strength(math.exp(log_p))
    return strength

