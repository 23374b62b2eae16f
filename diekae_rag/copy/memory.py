"""CopyMemory: the slots the copy readout reads, and where each passage's tokens sit among them.

One slot per knowledge token (its key, the row it writes, its match class), then the virtual
slots that :mod:`diekae_rag.copy.pieces` appends (the later pieces of words an answer writes
with other tokens than the passage). Built once per call, read by every position of the call.
"""

from __future__ import annotations

import bisect

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

LOG_FLOOR = -30.0  # the reader's log-probability for a slot no answer can start at


@dataclass(frozen=True)
class CopyMemory:
    """The pointer's slots for a batch (B items, S slots)."""

    keys: torch.Tensor                    # (B, heads, S, dk)
    values: torch.Tensor                  # (B, S, hidden): the row written when the slot is copied
    ids: torch.Tensor                     # (B, S) long: the token each slot writes
    valid: torch.Tensor                   # (B, S) bool
    prev: Optional[torch.Tensor] = None   # (B, S) long: match class of the token before the slot (-1: none)
    prev2: Optional[torch.Tensor] = None  # (B, S) long: the class two before (None: ``prev`` shifted)
    pred: Optional[torch.Tensor] = None   # (B, S) long: the slot each slot continues (None: s - 1)
    prior: Optional[torch.Tensor] = None  # (B, S) float: passage prior, added at every position
    first_bias: Optional[torch.Tensor] = None  # (B, S) float: the reader's score, at the first answer position
    first_ids: Optional[torch.Tensor] = None   # (B, S) long: the token the first copy writes instead (-1: keep)

    @property
    def width(self) -> int:
        return int(self.valid.shape[1])

    @classmethod
    def build(cls, keys: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, classes: torch.Tensor,
              values: torch.Tensor, match: bool) -> "CopyMemory":
        """One slot per position of ``ids`` (B, S), copyable where ``valid``; with the token match,
        each slot's match class before it (``classes`` maps ids to classes)."""
        prev = prev_classes(classes[ids], valid) if match else None
        return cls(keys=keys, values=values, ids=ids, valid=valid, prev=prev)

    def prev_two(self) -> torch.Tensor:
        return shifted_prev(self.prev) if self.prev2 is None else self.prev2

    def predecessors(self) -> torch.Tensor:
        return previous_slots(self.valid) if self.pred is None else self.pred


def previous_slots(valid: torch.Tensor) -> torch.Tensor:
    """(B, S) long: each slot's predecessor (s - 1; -1 for the first)."""
    return (torch.arange(valid.shape[1], device=valid.device) - 1)[None].expand(valid.shape[0], -1)


def shifted_prev(prev: torch.Tensor) -> torch.Tensor:
    """(B, S): each slot's class two tokens back, read positionally from the previous slot's ``prev``."""
    return torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)


def prev_classes(classes: torch.Tensor, knowledge: torch.Tensor) -> torch.Tensor:
    """(B, T): the match class of the knowledge token before each position, -1 where there is none."""
    prev = classes.masked_fill(~knowledge.bool(), -1)
    return torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)


def append_slots(memory: CopyMemory, values: torch.Tensor, ids: torch.Tensor, src: torch.Tensor,
                 valid: torch.Tensor, prev: torch.Tensor, pred: torch.Tensor) -> CopyMemory:
    """``memory`` with (B, V) virtual slots appended: each borrows slot ``src``'s key and prior, writes
    token ``ids`` (rows ``values``), has match class ``prev`` before it (the class two back read
    positionally, as for the pieces of one word), continues slot ``pred``, and is kept where ``valid``.
    A virtual slot is never the first copy: the floor reader score there, and no first-piece swap."""
    rows = torch.arange(src.shape[0], device=src.device)[:, None]
    keys = memory.keys[rows, :, src].permute(0, 2, 1, 3)  # (B, heads, V, dk)
    old2 = memory.prev_two()
    prev2 = torch.cat([old2, shifted_prev(torch.cat([memory.prev, prev], 1))[:, -prev.shape[1]:]], 1)
    first_bias = torch.zeros_like(memory.valid, dtype=torch.float) if memory.first_bias is None else memory.first_bias

    def cat(x, extra):
        return None if x is None else torch.cat([x, extra], 1)
    return replace(
        memory, keys=torch.cat([memory.keys, keys], 2), values=torch.cat([memory.values, values.to(memory.values.dtype)], 1),
        ids=torch.cat([memory.ids, ids], 1), valid=torch.cat([memory.valid, valid], 1),
        prev=torch.cat([memory.prev, prev], 1), prev2=prev2,
        pred=torch.cat([memory.predecessors(), pred], 1),
        prior=cat(memory.prior, memory.prior[rows, src] if memory.prior is not None else None),
        first_bias=torch.cat([first_bias, torch.full_like(valid, LOG_FLOOR, dtype=first_bias.dtype)], 1),
        first_ids=cat(memory.first_ids, torch.full_like(ids, -1)))


@dataclass(frozen=True)
class KnowledgeLayout:
    """Where each passage's tokens sit in the (left-padded) memory of ``width`` slots: per item,
    per passage, (its first slot, the kept tokens' character spans in the passage)."""

    width: int
    items: list[list[tuple[int, list[tuple[int, int]]]]]

    @classmethod
    def of(cls, segments: Sequence[Sequence[Sequence[int]]], kmasks: Sequence[Sequence[Sequence[bool]]],
           spans: Callable[[str], list[tuple[int, int]]], passages: Sequence[Sequence[str]], width: int
           ) -> "KnowledgeLayout":
        """From each item's isolated segments (prefix first, then separator + passage each) and their
        knowledge masks; ``spans(passage)`` gives a passage's token character spans."""
        out = []
        for segs, kms, ps in zip(segments, kmasks, passages):
            at = width - sum(len(s) for s in segs) + len(segs[0])  # after the padding and the prefix
            per = []
            for km, p in zip(kms[1:], ps):
                n_tok = sum(km)
                per.append((at + len(km) - n_tok, spans(p)[:n_tok]))
                at += len(km)
            out.append(per)
        return cls(width, out)

    def rows(self, values: Sequence[Sequence[Sequence[float]]], fill: float, dtype=None,
             device: Optional[torch.device] = None) -> torch.Tensor:
        """(B, width): ``values[b][i]`` (one per kept token of item b's passage i) at their slots,
        ``fill`` elsewhere."""
        rows = torch.full((len(self.items), self.width), fill, dtype=dtype)
        for b, per in enumerate(self.items):
            for (start, spans), vals in zip(per, values[b]):
                rows[b, start: start + len(spans)] = torch.tensor(vals, dtype=dtype)
        return rows.to(device)


def token_log_probs(char_lp: dict[int, float], offsets: Sequence[tuple[int, int]]) -> list[float]:
    """Map character log-probs onto tokens given by their character spans: a token gets the
    best start inside its span (so " Ithp" gets the score of "Ithp"), else ``LOG_FLOOR``."""
    if not char_lp:  # a passage the reader did not read
        return [LOG_FLOOR] * len(offsets)
    starts = sorted(char_lp)
    out = []
    for a, b in offsets:
        best, i = LOG_FLOOR, bisect.bisect_left(starts, a)
        while i < len(starts) and starts[i] < b:
            best = max(best, char_lp[starts[i]])
            i += 1
        out.append(best)
    return out
