"""Phase 2: the LM loss on the answer (plus end-of-turn) with injection; only encoders learn."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.mixture import Example
from ..injection import injecting
from ..model import DiekaeModel


def answer_logits(model: DiekaeModel, prompts: Sequence[list[int]], passages: Sequence[list[str]],
                  answers: Sequence[list[int]], mode: str = "diekae") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each answer token, and those tokens.

    Logits are computed only at answer positions, and the decoder's frozen layers below the
    first injected layer build no autograd graph.
    """
    ids, mask, inj = model.teacher_forcing_inputs(prompts, passages, answers, mode)
    with injecting(inj):
        hidden = model.decoder.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    pos_b, pos_t, targets = [], [], []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        for j, tok in enumerate(a):
            pos_b.append(b)
            pos_t.append(len(p) - 1 + j)
            targets.append(tok)
    dev = hidden.device
    h = hidden[torch.tensor(pos_b, device=dev), torch.tensor(pos_t, device=dev)]
    return model.decoder.get_output_embeddings()(h).float(), torch.tensor(targets, device=dev)


def lm_loss(model: DiekaeModel, batch: Sequence[Example], with_eos: bool = True) -> torch.Tensor:
    """Mean NLL of the answer tokens (and the end-of-answer token) given the injected passages."""
    prompts, passages = model._validate([e.question for e in batch], [e.passages for e in batch], "diekae")
    answers = [model.prompter.answer_ids(e.answer, with_eos) for e in batch]
    logits, targets = answer_logits(model, prompts, passages, answers)
    return F.cross_entropy(logits, targets)
