"""CopyReadout: one call's copy readout, from the pointer trunk's states to the rows it writes."""

from __future__ import annotations

from typing import Optional

import torch

from .config import CopyConfig
from .head import CopyHead
from .memory import CopyMemory
from .score import continued_attention, copy_attention, copy_scores, first_rows, reader_chooses_first
from .values import ValueRows


class CopyReadout:
    """Reads ``memory`` for every position of one call (the prefill, then each decode step).

    ``classes`` maps token ids to match classes (a word-start token and the same piece without the
    space share one). Between steps it keeps the class of the last token written (for the bigram)
    and the last position's attention before continuation (for continuation), so a decode step
    gives exactly what a full re-encode gives."""

    def __init__(self, head: CopyHead, memory: CopyMemory, copy: CopyConfig, classes: torch.Tensor,
                 values: ValueRows, match_scale: float) -> None:
        self.head, self.memory, self.copy = head, memory, copy
        self.classes, self.values, self.match_scale = classes, values, match_scale
        self.last_class: Optional[torch.Tensor] = None      # (B,)
        self.last_attention: Optional[torch.Tensor] = None  # (B, S)
        self.attention: Optional[torch.Tensor] = None       # (B, heads, T, S) of the last read

    def __call__(self, states: torch.Tensor, query_ids: torch.Tensor, prev_ids: Optional[torch.Tensor] = None,
                 first_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, hidden): the copy rows for query positions with pointer-trunk ``states`` (B, T, d)
        and tokens ``query_ids`` (B, T). ``prev_ids`` (B,): the token before the first query, when the
        call has no earlier step. ``first_positions`` (B,; -1: none): where each answer begins."""
        mem, copy, head = self.memory, self.copy, self.head
        classes = self.classes[query_ids]
        if prev_ids is not None:
            prev_class = self.classes[prev_ids]
        elif self.last_class is not None:
            prev_class = self.last_class
        else:
            prev_class = torch.full_like(classes[:, 0], -2)
        q = head.queries(states)
        match_weight = head.match_weight if head.has_match else None
        scores, match = copy_scores(q, mem, classes, prev_class, match_weight, self.match_scale, copy, first_positions)
        null = head.null_scores(q)
        if first_positions is not None and reader_chooses_first(copy, mem):
            # the "nothing" slot is out of the first copy's choice: whether the passages answer is the gate's
            at = first_rows(first_positions, null.shape[2]) & mem.valid.any(1)[:, None]
            null = null.masked_fill(at[:, None, :, None], float("-inf"))
        attn = copy_attention(scores, null, copy.sharpness)
        if copy.continue_bonus:
            attn, self.last_attention = continued_attention(scores, null, attn, copy, self.last_attention,
                                                            mem.predecessors(), match, first_positions)
            attn = attn.to(q.dtype)
        self.last_class = classes[:, -1] if classes.shape[1] else self.last_class
        self.attention = attn
        mixed = torch.einsum("bhts,h->bts", attn, head.gain.to(q.dtype) * copy.gain_scale)  # heads first
        out = mixed @ mem.values
        if first_positions is not None:
            if copy.first_unspaced:
                out = self._unspaced_first(out, mixed, first_positions)
            if copy.first_gain != 1.0:
                out = scale_at(out, first_positions, copy.first_gain)
        return out

    def _unspaced_first(self, out: torch.Tensor, mixed: torch.Tensor, first_positions: torch.Tensor) -> torch.Tensor:
        """``out`` with each item's first-position row written from the first pieces (``memory.first_ids``
        where >= 0) or else the slots' space-less variants (their match class: " Ithp" -> "Ithp")."""
        B, T = out.shape[:2]
        at = first_positions.clamp(0, T - 1)
        ids = self.classes[self.memory.ids]
        if self.memory.first_ids is not None:
            ids = torch.where(self.memory.first_ids >= 0, self.memory.first_ids, ids)
        values = self.values.rows(ids, self.copy.whitened_values, out.dtype)
        first = (mixed[torch.arange(B, device=at.device), at][:, None] @ values)[:, 0]  # (B, H)
        return torch.where(first_rows(first_positions, T)[..., None], first[:, None], out)


def scale_at(rows: torch.Tensor, positions: torch.Tensor, factor: float) -> torch.Tensor:
    """``rows`` (B, T, hidden) with row ``positions[b]`` of each item multiplied by ``factor``."""
    return rows * torch.where(first_rows(positions, rows.shape[1]), factor, 1.0)[..., None].to(rows.dtype)
