"""Phase 2: the LM loss on the answer (plus end-of-turn) with injection; only encoders learn.

Items whose passages do not answer (``Example.answerable`` False) are trained to step aside:
their target is the bare decoder's own next-token distribution (``mode="none"``) at their answer
positions (or the first only), a KL self-distillation, so the encoders learn to leave the decoder
alone there.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.mixture import Example
from ..model import DiekaeModel


def lm_loss(model: DiekaeModel, batch: Sequence[Example], with_eos: bool = True,
            first_token_weight: float = 1.0, negative_weight: float = 1.0, negative_first_only: bool = False
            ) -> torch.Tensor:
    """Weighted mean over answer tokens of the NLL given the injected passages, and, for items that
    the passages do not answer, of KL(bare decoder ‖ injected decoder) in its place.

    ``first_token_weight`` > 1 weighs each answer's first token more: it is the token where the
    pointer must choose which fact to copy; later ones mostly continue it. ``negative_weight``
    weighs the tokens of unanswerable items; with ``negative_first_only`` only their first token
    counts (where the copy would start), so nothing is taught about continuing a copy.
    """
    prompts, passages = model.prepare([e.question for e in batch], [e.passages for e in batch], "diekae")
    answers = [model.prompter.answer_ids(e.answer, with_eos) for e in batch]
    logits, targets = model.answer_logits(prompts, passages, answers)
    first = torch.tensor([j == 0 for a in answers for j in range(len(a))], device=logits.device)
    weights = torch.where(first, first_token_weight, 1.0)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    negative = [i for i, e in enumerate(batch) if not e.answerable]
    if negative:
        on_negative = torch.tensor([not batch[i].answerable for i, a in enumerate(answers) for _ in a],
                                   device=logits.device)
        with torch.no_grad():
            bare, _ = model.answer_logits([prompts[i] for i in negative], [[] for _ in negative],
                                          [answers[i] for i in negative], mode="none")
        kl = F.kl_div(F.log_softmax(logits[on_negative], -1), F.log_softmax(bare, -1), log_target=True,
                      reduction="none").sum(-1)
        per_token = per_token.masked_scatter(on_negative, kl)
        weights = torch.where(on_negative, weights * negative_weight, weights)
        if negative_first_only:
            weights = torch.where(on_negative & ~first, 0.0, weights)
    return (per_token * weights).sum() / weights.sum()
