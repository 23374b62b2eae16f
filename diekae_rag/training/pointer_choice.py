"""The pointer's choice of the answer's first token: a loss on the copy-attention itself.

At the position that predicts an answer's first token the pointer must choose which passage
token to copy. This loss is the negative log of the attention mass (heads weighted by their
gains) on the knowledge tokens where the answer starts in the passages. It needs only the
encoders, not the decoder (the passages are still re-encoded every step while training).
"""

from __future__ import annotations

import re
import weakref
from typing import Sequence

import torch

from ..data.mixture import Example
from ..model import DiekaeModel


def answer_starts(pieces: Sequence[str], knowledge: Sequence[bool], answer: str) -> list[bool]:
    """Which knowledge tokens hold the first character of an occurrence of ``answer``.

    ``pieces`` are the tokens' texts in order (their concatenation is the encoded text);
    a token like " Ithp" that starts with the space before the answer counts.
    """
    starts, text = [], ""
    for p in pieces:
        starts.append(len(text))
        text += p
    gold = [False] * len(pieces)
    target = answer.strip()
    if not target:
        return gold
    hits = [m.start() for m in re.finditer(re.escape(target), text)]
    for s, (a, p) in enumerate(zip(starts, pieces)):
        if knowledge[s] and any(a <= c < a + len(p) for c in hits):
            gold[s] = True
    return gold


class _PieceTexts:
    """Token id -> its text, decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in self.cache:
                self.cache[i] = self.tokenizer.decode([i])
            out.append(self.cache[i])
        return out


_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its _PieceTexts


def first_choice_targets(model: DiekaeModel, knowledge_ids: torch.Tensor, valid: torch.Tensor,
                         answers: Sequence[str]) -> torch.Tensor:
    """(B, T_k) bool: the pointer slots where each item's answer starts."""
    texts = _PIECES.setdefault(model.tokenizer, _PieceTexts(model.tokenizer))
    rows = [answer_starts(texts(ids.tolist()), v.tolist(), a) for ids, v, a in zip(knowledge_ids, valid, answers)]
    return torch.tensor(rows, dtype=torch.bool, device=knowledge_ids.device)


def pointer_choice_loss(model: DiekaeModel, batch: Sequence[Example]) -> torch.Tensor:
    """Mean over items (whose answer occurs in their passages) of -log(gold attention mass)
    at the position that predicts the answer's first token."""
    enc = model.encoder
    if enc.config.pointer_layer is None:
        raise ValueError("pointer_choice_loss needs encoders with a pointer readout (pointer_layer).")
    prompts, passages = model.prepare([e.question for e in batch], [e.passages for e in batch], "diekae")
    out, _, _, first = model.encode_knowledge(enc, prompts, passages, None)
    cache = out.cache
    if cache is None:
        raise ValueError("pointer_choice_loss needs per-step encoders (per_step=True) to read their pointer memory.")
    gold = first_choice_targets(model, cache.knowledge_ids, cache.pointer_valid, [e.answer for e in batch])
    attn = out.pointer_attention[torch.arange(len(batch), device=first.device), :, first]  # (B, heads, T_k)
    w = enc.pointer_gain.detach().abs()
    mass = torch.einsum("bhs,h->bs", attn.float(), (w / w.sum().clamp(min=1e-12)).float())
    has = gold.any(-1)
    if not bool(has.any()):
        return attn.sum() * 0.0  # no answer in any passage: nothing to learn from this batch
    return -torch.log((mass * gold).sum(-1)[has] + 1e-6).mean()
