"""Phase 2: the LM loss on the answer (plus end-of-turn) with injection; only encoders learn."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.mixture import Example
from ..model import DiekaeModel


def lm_loss(model: DiekaeModel, batch: Sequence[Example], with_eos: bool = True,
            first_token_weight: float = 1.0) -> torch.Tensor:
    """Mean NLL of the answer tokens (and the end-of-answer token) given the injected passages.

    ``first_token_weight`` > 1 weighs each answer's first token more (a weighted mean): it is
    the token where the pointer must choose which fact to copy; later ones mostly continue it.
    """
    prompts, passages = model.prepare([e.question for e in batch], [e.passages for e in batch], "diekae")
    answers = [model.prompter.answer_ids(e.answer, with_eos) for e in batch]
    logits, targets = model.answer_logits(prompts, passages, answers)
    weights = torch.tensor([first_token_weight if j == 0 else 1.0 for a in answers for j in range(len(a))],
                           device=logits.device)
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum()
