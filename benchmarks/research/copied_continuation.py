"""Continuation from the occurrence the copy is on, not the one it first read (dev probe; not served).

    python benchmarks/research/copied_continuation.py --grid gate_no_answer=0.5 --n 60 --negatives \
        --out benchmarks/results/copy_settings_copied_continuation.json

The served continuation (:func:`diekae_rag.copy.score.continued_attention`) gives a slot the attention
that the previous position gave the slot it continues *before* continuation, so that a prefill reads
every position at once. Where two occurrences tie on keys, the token match and the bigram (", a" after
"Tharvik" and after "brastik"), that attention is split or on the wrong one, and the copy can jump
("brastik, a salt merchant"). CopyNet's selective read uses the attention that was finally copied; this
probe serves that form (each position continues from the previous position's continued attention, so a
prefill reads the answer's positions in order) and then runs ``benchmarks/copy_settings.py`` with the
given arguments.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Optional

import torch

import diekae_rag.copy.readout as readout
from diekae_rag.copy import CopyConfig
from diekae_rag.copy.score import copy_attention


def copied_continuation(scores: torch.Tensor, null: torch.Tensor, attention: torch.Tensor, copy: CopyConfig,
                        last: Optional[torch.Tensor], pred: torch.Tensor, match: torch.Tensor,
                        first_positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """As ``continued_attention``, with each position continuing from the previous position's continued
    attention (``last``: the previous call's last position, continued)."""
    out = attention.float().clone()
    B, _, T, S = out.shape
    t = torch.arange(T, device=out.device)
    begun = (t[None, :] > first_positions[:, None]) if first_positions is not None else \
        torch.ones(B, T, dtype=torch.bool, device=out.device)
    steps = torch.nonzero(begun.any(0))[:, 0].tolist()
    if steps:
        src, has = pred.clamp(min=0), (pred >= 0).float()
        t0 = steps[0]
        prev = out[:, :, t0 - 1].mean(1) if t0 > 0 else (out.new_zeros(B, S) if last is None else last.float())
        for i in range(t0, T):
            cont = prev.gather(1, src) * has * match[:, i].float() * begun[:, i, None].float()
            read = copy_attention(scores[:, :, i].float() + copy.continue_bonus * cont[:, None], null[:, :, i].float(),
                                  copy.sharpness)
            out[:, :, i] = torch.where(begun[:, i, None, None], read, out[:, :, i])
            prev = out[:, :, i].mean(1)
    return out, out.mean(1)[:, -1] if T else last


if __name__ == "__main__":
    readout.continued_attention = copied_continuation
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "copy_settings.py"), run_name="__main__")
