"""What the copy writes for a token: its output-embedding row, or the whitened form of it."""

from __future__ import annotations

from typing import Optional

import torch


def whitener(lm_head: torch.Tensor, norm_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """(H, H): the inverse Gram matrix of the output layer as the final norm's output sees it
    (rows ``lm_head * norm_weight``), with a small ridge; float32 on ``lm_head``'s device."""
    Wg = lm_head.float() * (1.0 if norm_weight is None else norm_weight.float())
    G = Wg.T @ Wg
    ridge = 1e-4 * G.diagonal().mean() * torch.eye(G.shape[0], device=G.device)
    return torch.linalg.inv(G + ridge)


def whitened_values(lm_head: torch.Tensor, norm_weight: Optional[torch.Tensor], inv_gram: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
    """Value rows that raise token ``ids``' logits and as little as possible any other's.

    Through the final norm (weight g) the logits are ``(lm_head * g) @ h / rms``. The row
    ``d = inv_gram @ (lm_head * g)[v]`` changes them by the projection of the one-hot of ``v`` onto
    the output layer's column space, so ``v`` gains most; it is scaled to give ``v`` the same boost
    as the raw row ``lm_head[v]`` (so a gain trained on raw rows keeps its size for the copied token).
    A raw row also raises its look-alikes, often more than the token itself (" Sask" -> " tempfile").
    """
    w = lm_head[ids].float()
    wg = w * (1.0 if norm_weight is None else norm_weight.float())
    d = wg @ inv_gram
    scale = (wg * w).sum(-1, keepdim=True) / (wg * d).sum(-1, keepdim=True).clamp(min=1e-6)
    return d * scale


class ValueRows:
    """The value rows of one decoder: ``rows(ids, whitened)``. The whitener is made on first use,
    and each token's whitened row the first time a passage holds it: a table with a row per
    vocabulary entry is filled as tokens arrive (its pages are written only for those), so a
    passage's tokens cost one gather on later calls."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.lm_head = decoder.get_output_embeddings().weight
        norm = getattr(getattr(decoder, "model", None), "norm", None)
        self.norm_weight = getattr(norm, "weight", None)
        self._whitener: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None  # (V, H) float32 whitened rows, valid where _made
        self._made: Optional[torch.Tensor] = None   # (V,) bool

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    def rows(self, ids: torch.Tensor, whitened: bool, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            if not whitened:
                return self.lm_head[ids].to(dtype)
            return self._whitened(ids).to(dtype)

    def _whitened(self, ids: torch.Tensor) -> torch.Tensor:
        if self._whitener is None:
            self._whitener = whitener(self.lm_head, self.norm_weight)
            self._table = torch.empty(self.lm_head.shape, dtype=torch.float32, device=self.lm_head.device)
            self._made = torch.zeros(self.lm_head.shape[0], dtype=torch.bool, device=self.lm_head.device)
        new = ids[~self._made[ids]].unique()
        if new.numel():  # rows written before the flags, so a concurrent call never reads an unwritten row
            self._table[new] = whitened_values(self.lm_head, self.norm_weight, self._whitener, new)
            self._made[new] = True
        return self._table[ids]
