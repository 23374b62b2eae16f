"""The DIEKÆ encoders: one small causal transformer per injected decoder layer.

All encoders run as one stacked module (weights carry a leading ``n`` dimension and every
matmul is a single ``bmm``), so adding layers adds no Python loop. Each encoder is

    frozen decoder embedding -> down-projection (hidden -> d_enc) -> causal blocks
    -> RMSNorm -> up-projection (d_enc -> hidden, no bias, zero-initialised)

and an optional extra trunk whose states feed the copy readout (:mod:`diekae_rag.copy`): a
copy-attention over the knowledge tokens. The trunk holds the readout's learned head
(:class:`~diekae_rag.copy.head.CopyHead`) but none of its serving-time terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .copy.head import CopyHead


class StackedLinear(nn.Module):
    """``n`` independent bias-free linear maps applied to ``n`` stacked inputs in one bmm."""

    def __init__(self, n: int, d_in: int, d_out: int, zero_init: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d_in, d_out))
        if not zero_init:
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, ..., d_in)
        shape = x.shape
        y = torch.bmm(x.reshape(shape[0], -1, shape[-1]), self.weight.to(x.dtype))
        return y.reshape(*shape[:-1], y.shape[-1])


class StackedRMSNorm(nn.Module):
    def __init__(self, n: int, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, B, T, d)
        w = self.weight.to(x.dtype)[:, None, None, :]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables (1, B, 1, T, head_dim) for ``positions`` (B, T), built once per forward."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.to(torch.float32)[..., None] * inv  # (B, T, hd/2)
    ang = torch.cat([ang, ang], -1)[None, :, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply rotary embeddings. x: (n, B, h, T, hd); rope: the tables of :func:`rope_tables`."""
    cos, sin = rope
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def append_kv(past: torch.Tensor, new: torch.Tensor, room: int = 64) -> torch.Tensor:
    """``cat([past, new], 3)`` for (n, B, h, T, hd) keys/values, without re-copying the past each step.

    The result is a view into a buffer with spare positions; when ``past`` is such a view with
    room left, ``new`` is written in place (a decode step copies one position, not all of them).
    Only the newest view of a buffer may be extended (one generation call owns its cache).
    """
    if torch.is_grad_enabled() and (past.requires_grad or new.requires_grad):
        return torch.cat([past, new], 3)  # training: keep the graph simple
    n, B, h, L, hd = past.shape
    T = new.shape[3]
    st = past.stride()
    cap = st[2] // hd if hd else 0
    if (past.storage_offset() == 0 and st[4] == 1 and st[3] == hd and st[1] == h * st[2] and st[0] == B * st[1]
            and L + T <= cap and past.untyped_storage().nbytes() >= n * st[0] * past.element_size()):
        full = past.as_strided((n, B, h, L + T, hd), st)
        full[:, :, :, L:] = new
        return full
    buf = past.new_empty((n, B, h, L + T + room, hd))
    buf[:, :, :, :L] = past
    buf[:, :, :, L:L + T] = new
    return buf[:, :, :, :L + T]


class Block(nn.Module):
    """A pre-norm causal transformer block (attention + SwiGLU), stacked over ``n`` encoders."""

    def __init__(self, n: int, d: int, heads: int) -> None:
        super().__init__()
        ff = 32 * math.ceil(8 * d / 3 / 32)
        self.heads, self.ff = heads, ff
        self.norm1 = StackedRMSNorm(n, d)
        self.qkv = StackedLinear(n, d, 3 * d)
        self.proj = StackedLinear(n, d, d)
        self.norm2 = StackedRMSNorm(n, d)
        self.gate_up = StackedLinear(n, d, 2 * ff)
        self.down = StackedLinear(n, ff, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n, B, T, d = x.shape
        h, hd = self.heads, d // self.heads
        q, k, v = (t.reshape(n, B, T, h, hd).transpose(2, 3) for t in self.qkv(self.norm1(x)).split(d, -1))
        q, k = rotary(q, rope), rotary(k, rope)
        if past is not None:
            k, v = append_kv(past[0], k), append_kv(past[1], v)
        Tk = k.shape[3]
        y = F.scaled_dot_product_attention(
            q.reshape(n * B, h, T, hd), k.reshape(n * B, h, Tk, hd), v.reshape(n * B, h, Tk, hd),
            attn_mask=mask.unsqueeze(0).expand(n, B, 1, T, Tk).reshape(n * B, 1, T, Tk))
        x = x + self.proj(y.reshape(n, B, h, T, hd).transpose(2, 3).reshape(n, B, T, d))
        gate, up = self.gate_up(self.norm2(x)).split(self.ff, -1)
        x = x + self.down(F.silu(gate) * up)
        return x, (k, v)


@dataclass
class EncoderCache:
    """What a decode step needs from earlier positions: the blocks' keys and values, and positions."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    key_valid: torch.Tensor                       # (B, T_past) bool
    next_position: torch.Tensor                   # (B,)


@dataclass
class EncoderOutput:
    rows: Optional[torch.Tensor]      # (n_inj, B, T - start, hidden): added to layers[i]'s MLP output
    states: Optional[torch.Tensor]    # (B, T, d_enc): the pointer trunk's states, every input position
    cache: Optional[EncoderCache] = None
    start: int = 0                    # rows cover input positions start..T-1


class DiekaeEncoder(nn.Module):
    """All encoders of one checkpoint, run as one stacked module.

    The decoder's input embedding is used frozen and is *not* part of this module's state: call
    :meth:`attach` with the decoder before use.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        n, d, H = config.n_trunks, config.d_enc, config.hidden_size
        self.down = nn.Linear(H, n * d, bias=False)
        self.blocks = nn.ModuleList(Block(n, d, config.n_heads) for _ in range(config.n_blocks))
        self.norm = StackedRMSNorm(n, d)
        self.up = StackedLinear(config.n_injection, d, H, zero_init=True) if config.n_injection else None
        self.copy_head = (CopyHead(d, config.pointer_heads, config.pointer_key_dim, config.pointer_match)
                          if config.pointer_layer is not None else None)
        self._frozen: list[nn.Module] = []  # [input embedding], not saved

    def attach(self, decoder: nn.Module) -> "DiekaeEncoder":
        """Use ``decoder``'s frozen input embedding."""
        self._frozen = [decoder.get_input_embeddings()]
        return self

    def add_pointer_match(self) -> None:
        """Add the token-match weight (zero: no effect until trained) and switch the match on."""
        self.copy_head.add_match()
        self.config.pointer_match = True

    @property
    def dtype(self) -> torch.dtype:
        return self.down.weight.dtype

    def served_in(self, dtype: torch.dtype) -> "DiekaeEncoder":
        """These weights cast to ``dtype``, on the same frozen embedding (``self`` when already in
        ``dtype``): the encoders that read the question and take the decode steps, while the passages'
        states stay those this encoder computes."""
        if dtype == self.dtype:
            return self
        twin = DiekaeEncoder(self.config).to(device=self.down.weight.device, dtype=dtype)
        twin.load_state_dict(self.state_dict())
        twin._frozen = self._frozen
        return twin.eval().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: Optional[EncoderCache] = None, use_cache: bool = False,
                output_start: int = 0) -> EncoderOutput:
        """Encode ``input_ids`` (B, T), continuing from ``cache`` when given.

        Rows are computed for positions ``output_start:`` only: the knowledge positions need states
        (for attention) but never receive rows. The pointer trunk's states cover every position
        (the copy memory's keys come from the knowledge positions).
        """
        if not self._frozen:
            raise RuntimeError("DiekaeEncoder.attach(decoder) must be called before encoding.")
        embed = self._frozen[0]
        cfg = self.config
        B, T = input_ids.shape
        valid = attention_mask.bool()
        if cache is None:
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            key_valid, past_len = valid, 0
        else:
            positions = cache.next_position[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
            key_valid, past_len = torch.cat([cache.key_valid, valid], 1), cache.key_valid.shape[1]
        # Causal mask over valid keys; each query always sees itself (so padded rows stay finite).
        q_idx = torch.arange(T, device=input_ids.device)[:, None] + past_len
        k_idx = torch.arange(past_len + T, device=input_ids.device)[None, :]
        mask = ((k_idx <= q_idx)[None] & key_valid[:, None, :]) | (k_idx == q_idx)[None]
        mask = mask[:, None]  # (B, 1, T, Tk)

        with torch.no_grad():
            e = embed(input_ids).to(self.dtype)
        n, d = cfg.n_trunks, cfg.d_enc
        x = self.down(e).reshape(B, T, n, d).permute(2, 0, 1, 3)
        new_kv = []
        rope = rope_tables(positions, d // cfg.n_heads, cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks):
            x, kv = block(x, rope, mask, None if cache is None else cache.kv[i])
            new_kv.append(kv)
        x = self.norm(x)

        rows = self.up(x[: cfg.n_injection, :, output_start:]) if self.up is not None else None
        states = x[-1] if self.copy_head is not None else None
        new_cache = EncoderCache(new_kv, key_valid, positions[:, -1] + 1) if use_cache else None
        return EncoderOutput(rows=rows, states=states, cache=new_cache, start=output_start)
