"""CopyHead: the learned part of the copy readout."""

from __future__ import annotations

import math

import torch
from torch import nn


class CopyHead(nn.Module):
    """Reads the pointer trunk's states: a query per position, a key per knowledge slot (the key of
    position ``s`` comes from the state at ``s - 1``: the induction pattern), a "nothing" slot,
    a gain per head and, with the token match, a match weight per head (all zero-initialised
    where they write, so an untrained head adds nothing)."""

    def __init__(self, d_enc: int, heads: int, key_dim: int, match: bool) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.q = nn.Linear(d_enc, heads * key_dim, bias=False)
        self.k = nn.Linear(d_enc, heads * key_dim, bias=False)
        self.null = nn.Parameter(torch.zeros(heads, key_dim))
        self.gain = nn.Parameter(torch.zeros(heads))
        if match:
            self.add_match()

    @property
    def has_match(self) -> bool:
        return hasattr(self, "match_weight")

    def add_match(self) -> None:
        """Add the token-match weight (zero: no effect until trained)."""
        if not self.has_match:
            self.match_weight = nn.Parameter(torch.zeros_like(self.gain))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, h*dk) -> (B, h, T, dk)
        B, T = x.shape[:2]
        return x.reshape(B, T, self.heads, self.key_dim).transpose(1, 2)

    def queries(self, states: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, dk) from the pointer trunk's states (B, T, d)."""
        return self._split(self.q(states))

    def keys(self, states: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, dk): position ``s``'s key from the state at ``s - 1`` (zeros at 0)."""
        k = self._split(self.k(states))
        return torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], 2)

    def null_scores(self, q: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, 1): the "nothing" slot's score for each query."""
        return (q @ self.null.to(q.dtype)[None, :, :, None]) / math.sqrt(self.key_dim)
