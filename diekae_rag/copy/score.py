"""The pointer score: what decides which knowledge token the copy readout writes.

One function, :func:`copy_scores`, assembles it; each term is a small function below it. The
terms are added in the order the formula lists them (the order fixes the float rounding)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import CopyConfig
from .memory import CopyMemory


def copy_scores(q: torch.Tensor, memory: CopyMemory, query_classes: torch.Tensor, prev_class: torch.Tensor,
                match_weight: Optional[torch.Tensor], match_scale: float, copy: CopyConfig,
                first_positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The score of every memory slot ``j`` for every query position ``t`` (heads ``h``), and the
    token-match mask (None without the match). For item ``b``:

        s[h,t,j] = κ[t] · q[h,t]·k[h,j] / sqrt(dk)                       key
                 + match_scale · w_match[h] · M[t,j]                      token match
                 + bigram_bonus · M[t,j] · [class(x[t-1]) = prev2[j]]     bigram
                 + prior[j]                                               passage prior
                 + [t = first] · first_bias[j]                            answer-start reader
                 (-inf where slot j is not valid)

    where ``M[t,j] = [class(x[t]) = prev[j]]``: the token before slot ``j`` is the one just written,
    so a copy continues where it is, and ``κ[t]`` is ``first_key_scale`` at the first position when
    the reader scores it (:func:`reader_chooses_first`; the keys read each passage alone, the reader
    and the prior read the question), else 1. :func:`continued_attention` adds one more term after a
    first softmax, and :func:`copy_attention` turns scores into attention (with the "nothing" slot
    and sharpness).
    """
    scores = key_term(q, memory.keys)
    if first_positions is not None and reader_chooses_first(copy, memory):
        first = first_rows(first_positions, q.shape[2])
        scores = scores * torch.where(first, copy.first_key_scale, 1.0).to(q.dtype)[:, None, :, None]
    match = None
    if memory.prev is not None and match_weight is not None:
        match = query_classes[:, :, None] == memory.prev[:, None, :]          # (B, T, S)
        scores = scores + match_term(match, match_weight, match_scale, q.dtype)
        if copy.bigram_bonus:
            scores = scores + bigram_term(match, prev_class, query_classes, memory.prev_two(), copy.bigram_bonus,
                                          q.dtype)
    if memory.prior is not None:
        scores = scores + memory.prior[:, None, None, :].to(q.dtype)
    if first_positions is not None and memory.first_bias is not None:
        scores = scores + at_first(memory.first_bias.to(q.dtype), first_positions, q.shape[2])[:, None]
    return scores.masked_fill(~memory.valid[:, None, None, :], float("-inf")), match


def key_term(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, h, T, S): scaled dot products of the queries with the slots' keys."""
    return q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])


def match_term(match: torch.Tensor, weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """(B, h, T, S): the learned bonus per head where the token before a slot is the query's token
    (an explicit induction prior)."""
    w = weight.to(dtype) * scale
    return match[:, None].to(dtype) * w[None, :, None, None]


def bigram_term(match: torch.Tensor, prev_class: torch.Tensor, query_classes: torch.Tensor,
                prev2: torch.Tensor, bonus: float, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, S): a fixed bonus where the token match holds and the token two before the slot is
    also the query's previous token, so a copy keeps its place when a piece repeats inside a name.
    ``prev_class`` (B,) is the class of the token before the first query (-2: none)."""
    q_prev = torch.cat([prev_class[:, None], query_classes[:, :-1]], 1)
    bigram = match & (q_prev[:, :, None] == prev2[:, None, :])
    return bigram[:, None].to(dtype) * bonus


def reader_chooses_first(copy: CopyConfig, memory: CopyMemory) -> bool:
    """Whether ``first_key_scale`` acts: it is not 1 and the answer-start reader scores the first position."""
    return copy.first_key_scale != 1.0 and bool(copy.reader_weight) and memory.first_bias is not None


def first_rows(first_positions: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(B, T) bool: each item's first position (none where it is -1 or outside the T positions)."""
    t = torch.arange(n_positions, device=first_positions.device)
    return (t[None] == first_positions[:, None]) & (first_positions >= 0)[:, None]


def at_first(scores: torch.Tensor, first_positions: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(B, T, S): each item's slot ``scores`` (B, S) at its first position, zero elsewhere."""
    at = first_rows(first_positions, n_positions)
    return torch.where(at[..., None], scores[:, None, :], scores.new_zeros(()))


def copy_attention(scores: torch.Tensor, null: torch.Tensor, sharpness: float) -> torch.Tensor:
    """(B, h, T, S): softmax over the slots and the "nothing" slot (left out of the result), with
    every score multiplied by ``sharpness`` first."""
    return torch.softmax(torch.cat([scores, null], -1) * sharpness, -1)[..., :-1]


def continued_attention(scores: torch.Tensor, null: torch.Tensor, attention: torch.Tensor, copy: CopyConfig,
                        last: Optional[torch.Tensor], pred: torch.Tensor, match: torch.Tensor,
                        first_positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, h, T, S) float32: ``attention`` read again with :func:`continuation`'s term added (times
    ``copy.continue_bonus``), and what the next call continues from: the last position's attention
    before continuation, heads averaged (``last`` where there are no positions)."""
    cont = continuation(attention, last, pred, match, first_positions)
    # in float32: a bonus of hundreds would leave bf16 scores a resolution of several units
    out = copy_attention(scores.float() + (copy.continue_bonus * cont)[:, None], null.float(), copy.sharpness)
    return out, attention.mean(1)[:, -1] if attention.shape[2] else last


def continuation(attention: torch.Tensor, last: Optional[torch.Tensor], pred: torch.Tensor, match: torch.Tensor,
                 first_positions: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, T, S) float32: CopyNet's "selective read". Where the token match holds, each slot gets the
    attention (heads averaged, before continuation) that the previous position gave the slot it
    continues (``pred``; the previous call's last position for the first, ``last``), so a copy keeps
    to the occurrence it started on ("487", not "49", after "4"). Only once the answer has begun
    (after ``first_positions``): the question copies nothing. Multiplied by ``continue_bonus``."""
    seen = attention.mean(1)
    before = torch.cat([torch.zeros_like(seen[:, :1]) if last is None else last[:, None].to(seen.dtype),
                        seen[:, :-1]], 1)
    cont = before.gather(2, pred.clamp(min=0)[:, None, :].expand(-1, seen.shape[1], -1))
    cont = cont * (pred >= 0)[:, None, :].to(cont.dtype) * match.to(cont.dtype)
    if first_positions is not None:
        begun = torch.arange(seen.shape[1], device=seen.device)[None, :] > first_positions[:, None]
        cont = cont * begun[:, :, None].to(cont.dtype)
    return cont.float()
