"""The DIEKÆ encoders: one small causal transformer per injected decoder layer.

All encoders run as one stacked module (weights carry a leading ``n`` dimension and every
matmul is a single ``bmm``), so adding layers adds no Python loop. Each encoder is

    frozen decoder embedding -> down-projection (hidden -> d_enc) -> causal blocks
    -> RMSNorm -> up-projection (d_enc -> hidden, no bias, zero-initialised)

and an optional extra trunk feeds the *pointer readout*: a copy-attention over the
knowledge tokens whose values are the decoder's own (frozen) output-embedding rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiekaeConfig


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
    """What a decode step needs from earlier positions: block KV, positions, pointer memory."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    key_valid: torch.Tensor                       # (B, T_past) bool
    next_position: torch.Tensor                   # (B,)
    pointer_keys: Optional[torch.Tensor] = None   # (B, heads, T_k, dk)
    pointer_values: Optional[torch.Tensor] = None  # (B, T_k, hidden)
    pointer_valid: Optional[torch.Tensor] = None  # (B, T_k) bool
    pointer_prev: Optional[torch.Tensor] = None   # (B, T_k) long: match class of the knowledge token before, or -1
    pointer_prev2: Optional[torch.Tensor] = None  # (B, T_k) long: the class two before (None: pointer_prev shifted)
    match_only: Optional[torch.Tensor] = None     # (B, T_k) bool: slots reachable only where the match (bigram, if on) holds
    knowledge_bias: Optional[torch.Tensor] = None  # (B, T_k) float: log prior of each key's passage (0: none)
    last_class: Optional[torch.Tensor] = None     # (B,) long: match class of the last input token (bigram match)
    knowledge_ids: Optional[torch.Tensor] = None  # (B, T_k) long: the token id of each pointer slot
    first_keys: Optional[torch.Tensor] = None     # (B, T_k, r): passage side of the first-token scorer
    pointer_pred: Optional[torch.Tensor] = None   # (B, T_k) long: the slot each slot continues, -1: none (None: s-1)
    last_attention: Optional[torch.Tensor] = None  # (B, T_k): the last position's attention before continuation


@dataclass
class EncoderOutput:
    rows: Optional[torch.Tensor]      # (n_inj, B, T, hidden): added to layers[i]'s MLP output
    pointer: Optional[torch.Tensor]   # (B, T, hidden): added to pointer_layer's MLP output
    cache: Optional[EncoderCache] = None
    start: int = 0                    # outputs cover input positions start..T-1
    pointer_attention: Optional[torch.Tensor] = None  # (B, heads, T - start, T_k), "nothing" slot left out


class DiekaeEncoder(nn.Module):
    """All encoders of one checkpoint, run as one stacked module.

    The decoder's input embedding and output embedding are used frozen and are *not*
    part of this module's state: call :meth:`attach` with the decoder before use.
    """

    def __init__(self, config: DiekaeConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        n, d, H = config.n_trunks, config.d_enc, config.hidden_size
        self.down = nn.Linear(H, n * d, bias=False)
        self.blocks = nn.ModuleList(Block(n, d, config.n_heads) for _ in range(config.n_blocks))
        self.norm = StackedRMSNorm(n, d)
        self.up = StackedLinear(config.n_injection, d, H, zero_init=True) if config.n_injection else None
        if config.pointer_layer is not None:
            ph, dk = config.pointer_heads, config.pointer_key_dim
            self.pointer_q = nn.Linear(d, ph * dk, bias=False)
            self.pointer_k = nn.Linear(d, ph * dk, bias=False)
            self.pointer_null = nn.Parameter(torch.zeros(ph, dk))
            self.pointer_gain = nn.Parameter(torch.zeros(ph))  # zero: an untrained pointer adds nothing
            if config.pointer_match:
                self.add_pointer_match()
            if config.pointer_first_scorer:
                self.add_first_scorer(config.pointer_first_scorer)
        # Token -> match class (e.g. " Ithp" and "Ithp" alike); set from the tokenizer, not saved.
        self.register_buffer("match_classes", None, persistent=False)
        self._frozen: list[nn.Module] = []  # [input embedding, output embedding], not saved
        self._final_norm: Optional[torch.Tensor] = None  # the decoder's final RMSNorm weight, not saved
        self._whitener: Optional[torch.Tensor] = None   # (hidden, hidden), made on first use

    def attach(self, decoder: nn.Module) -> "DiekaeEncoder":
        """Use ``decoder``'s frozen input and output embeddings (and its final norm's weight)."""
        self._frozen = [decoder.get_input_embeddings(), decoder.get_output_embeddings()]
        norm = getattr(getattr(decoder, "model", None), "norm", None)
        self._final_norm = getattr(norm, "weight", None)
        self._whitener = None
        return self

    def value_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The pointer's value rows for token ``ids``: output-embedding rows, or their whitened
        form with ``pointer_whitened_values``."""
        lm_head = self._frozen[1].weight
        with torch.no_grad():
            if not self.config.pointer_whitened_values:
                return lm_head[ids].to(self.dtype)
            if self._whitener is None:
                self._whitener = whitener(lm_head, self._final_norm)
            return whitened_values(lm_head, self._final_norm, self._whitener, ids).to(self.dtype)

    def add_pointer_match(self) -> None:
        """Add the token-match weight (zero: no effect until trained) and switch the prior on."""
        if not hasattr(self, "pointer_match_weight"):
            self.pointer_match_weight = nn.Parameter(torch.zeros_like(self.pointer_gain))
        self.config.pointer_match = True

    def add_first_scorer(self, width: int) -> None:
        """Add the first-token scorer (its output weight starts at zero: no effect until trained)."""
        if not hasattr(self, "first_q"):
            d = self.config.d_enc
            self.first_q = nn.Linear(d, width).to(self.down.weight)
            self.first_k = nn.Linear(2 * d, width, bias=False).to(self.down.weight)
            self.first_v = nn.Parameter(torch.zeros(width, device=self.down.weight.device, dtype=self.dtype))
        self.config.pointer_first_scorer = width

    def first_scores(self, query_states: torch.Tensor, first_keys: torch.Tensor) -> torch.Tensor:
        """(B, T_k) first-token scores from the question's pointer states (B, d) and cached keys."""
        u = self.first_q(query_states).to(first_keys.dtype)
        return F.gelu(first_keys + u[:, None]) @ self.first_v.to(first_keys.dtype)

    def set_match_classes(self, classes: torch.Tensor) -> None:
        """Map token ids to match classes (see :func:`diekae_rag.prompts.match_classes`); unset: ids."""
        self.match_classes = classes.to(self.down.weight.device)

    def _classes(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.match_classes is None else self.match_classes[ids]

    def pointer_prev(self, ids: torch.Tensor, knowledge: torch.Tensor) -> torch.Tensor:
        """(B, T): the match class of the knowledge token before each position, -1 where there is none."""
        prev = self._classes(ids).masked_fill(~knowledge.bool(), -1)
        return torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.down.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                knowledge_mask: Optional[torch.Tensor] = None,
                cache: Optional[EncoderCache] = None, use_cache: bool = False,
                output_start: int = 0, first_positions: Optional[torch.Tensor] = None,
                first_bias: Optional[torch.Tensor] = None,
                first_value_ids: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode ``input_ids`` (B, T), continuing from ``cache`` when given.

        ``knowledge_mask`` (B, T) marks the knowledge tokens the pointer may copy from; it is
        only read on the first call (the prefill), later steps reuse the cached pointer memory.
        A ``cache`` built from isolated passages may carry ``knowledge_bias``, added to the
        pointer's score of each knowledge token: the log prior of its passage (see
        :mod:`diekae_rag.passage_prior`), so the copy-attention favours the relevant passage.
        Outputs (rows, pointer) are computed for positions ``output_start:`` only: the
        knowledge positions need states (for attention) but never receive rows.
        ``first_positions`` (B,), in output positions (-1: none), are where each item's answer
        begins (the position predicting its first token): the first-token scorer acts there only,
        and so does ``first_bias`` (B, T_k), a score per knowledge token given from outside (the
        answer-start reader's, see :mod:`diekae_rag.answer_reader`). With ``pointer_first_unspaced``,
        ``first_value_ids`` (B, T_k; -1: keep the token) are the tokens to copy there instead of
        the knowledge tokens (default: their space-less match classes).
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
        pointer = None
        p_keys = p_values = p_valid = p_prev = p_prev2 = p_bias = p_ids = f_keys = attn = match_only = None
        p_pred = last_attention = None
        if cfg.pointer_layer is not None:
            hp = x[-1]  # (B, T, d)
            ph, dk = cfg.pointer_heads, cfg.pointer_key_dim
            if cache is None or cache.pointer_keys is None:
                if knowledge_mask is None:
                    knowledge_mask = torch.zeros_like(valid)
                # The key of position s comes from the state at s-1 (the induction pattern).
                k_all = self.pointer_k(hp).reshape(B, T, ph, dk).transpose(1, 2)
                p_keys = torch.cat([torch.zeros_like(k_all[:, :, :1]), k_all[:, :, :-1]], 2)
                if cfg.pointer_first_scorer:
                    h_prev = torch.cat([torch.zeros_like(hp[:, :1]), hp[:, :-1]], 1)
                    f_keys = self.first_k(torch.cat([h_prev, hp], -1))
                p_values = self.value_rows(input_ids)
                p_valid = knowledge_mask.bool() & valid
                if cfg.pointer_match:
                    p_prev = self.pointer_prev(input_ids, p_valid)
                p_valid[:, 0] = False
                p_ids = input_ids
            else:
                p_keys, p_values, p_valid = cache.pointer_keys, cache.pointer_values, cache.pointer_valid
                p_prev, p_prev2, p_bias = cache.pointer_prev, cache.pointer_prev2, cache.knowledge_bias
                match_only = cache.match_only
                p_ids, f_keys, p_pred = cache.knowledge_ids, cache.first_keys, cache.pointer_pred
            hq = hp[:, output_start:]
            q = self.pointer_q(hq).reshape(B, hq.shape[1], ph, dk).transpose(1, 2)  # (B, ph, Tq, dk)
            scores = q @ p_keys.transpose(-1, -2) / math.sqrt(dk)       # (B, ph, T, Tk)
            if cfg.pointer_match:
                # Induction prior: the key after a knowledge token equal to the query's token gets a bonus.
                match = self._classes(input_ids[:, output_start:])[:, :, None] == p_prev[:, None, :]
                w = self.pointer_match_weight.to(q.dtype) * cfg.pointer_match_scale
                scores = scores + match[:, None].to(q.dtype) * w[None, :, None, None]
                if cfg.pointer_bigram_bonus:
                    # ... and a fixed extra bonus where the token before that matches the query's previous token
                    # too, so a copy keeps its place when a piece repeats inside a name.
                    before = self._classes(input_ids[:, max(output_start - 1, 0): -1])
                    first = (cache.last_class if cache is not None and cache.last_class is not None
                             else torch.full_like(input_ids[:, 0], -2))
                    q_prev = before if output_start > 0 else torch.cat([first[:, None], before], 1)
                    k_prev2 = shifted_prev(p_prev) if p_prev2 is None else p_prev2
                    bigram = match & (q_prev[:, :, None] == k_prev2[:, None, :])
                    scores = scores + bigram[:, None].to(q.dtype) * cfg.pointer_bigram_bonus
                if match_only is not None:  # e.g. stop slots: only right after their token (and the one before) was written
                    held = bigram if cfg.pointer_bigram_bonus else match
                    scores = scores.masked_fill((match_only[:, None, :] & ~held)[:, None], float("-inf"))
            if p_bias is not None:
                scores = scores + p_bias[:, None, None, :].to(q.dtype)
            if first_positions is not None:
                extra = None
                if cfg.pointer_first_scorer and f_keys is not None:
                    at = first_positions.clamp(0, hq.shape[1] - 1)
                    extra = self.first_scores(hq[torch.arange(B, device=at.device), at], f_keys)
                if first_bias is not None:
                    extra = first_bias if extra is None else extra + first_bias
                if extra is not None:
                    scores = scores + at_first(extra.to(q.dtype), first_positions, hq.shape[1])[:, None]
            scores = scores.masked_fill(~p_valid[:, None, None, :], float("-inf"))
            null = (q @ self.pointer_null.to(q.dtype)[None, :, :, None]) / math.sqrt(dk)  # (B, ph, T, 1)
            attn = torch.softmax(torch.cat([scores, null], -1) * cfg.pointer_sharpness, -1)[..., :-1]
            if cfg.pointer_continue_bonus:
                # Continuation (CopyNet's "selective read"): where the token match holds, a slot gets a bonus
                # in proportion to the attention the previous position gave the slot it continues, so a copy
                # keeps to the occurrence it started on ("487", not "49", after "4").
                seen = attn.mean(1)  # (B, Tq, T_k), before continuation: the same in a decode step and a re-encode
                last = cache.last_attention if cache is not None and cache.last_attention is not None else None
                before = torch.cat([torch.zeros_like(seen[:, :1]) if last is None else last[:, None].to(seen.dtype),
                                    seen[:, :-1]], 1)
                pred = p_pred if p_pred is not None else previous_slots(p_valid)
                cont = before.gather(2, pred.clamp(min=0)[:, None, :].expand(-1, seen.shape[1], -1))
                cont = cont * (pred >= 0)[:, None, :].to(cont.dtype) * match.to(cont.dtype)
                if first_positions is not None:  # only once the answer has begun: the question copies nothing
                    begun = torch.arange(seen.shape[1], device=seen.device)[None, :] > first_positions[:, None]
                    cont = cont * begun[:, :, None].to(cont.dtype)
                # in float32: a bonus of hundreds would leave bf16 scores a resolution of several units
                scores = scores.float() + (cfg.pointer_continue_bonus * cont.float())[:, None]
                attn = torch.softmax(torch.cat([scores, null.float()], -1) * cfg.pointer_sharpness, -1)[..., :-1]
                attn = attn.to(q.dtype)
                last_attention = seen[:, -1] if seen.shape[1] else last
            gain = self.pointer_gain.to(q.dtype) * cfg.pointer_gain_scale
            mixed = torch.einsum("bhts,h->bts", attn, gain)  # heads first: one (T, S) @ (S, H)
            pointer = mixed @ p_values
            if cfg.pointer_first_unspaced and first_positions is not None:
                pointer = self._unspaced_first(pointer, mixed, p_ids, first_positions, first_value_ids)

        new_cache = None
        if use_cache:
            new_cache = EncoderCache(kv=new_kv, key_valid=key_valid,
                                     next_position=positions[:, -1] + 1,
                                     pointer_keys=p_keys, pointer_values=p_values, pointer_valid=p_valid,
                                     pointer_prev=p_prev, pointer_prev2=p_prev2, knowledge_bias=p_bias,
                                     match_only=match_only,
                                     last_class=self._classes(input_ids[:, -1]),
                                     knowledge_ids=p_ids, first_keys=f_keys, pointer_pred=p_pred,
                                     last_attention=last_attention)
        return EncoderOutput(rows=rows, pointer=pointer, cache=new_cache, start=output_start,
                             pointer_attention=attn)

    def _unspaced_first(self, pointer: torch.Tensor, mixed: torch.Tensor, p_ids: torch.Tensor,
                        first_positions: torch.Tensor, value_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pointer`` with each item's first-position row copied from ``value_ids`` where given (>= 0),
        else from the knowledge tokens' space-less variants (their match class: " Ithp" -> "Ithp")."""
        B, T = pointer.shape[:2]
        at = first_positions.clamp(0, T - 1)
        rows = torch.arange(B, device=at.device)
        ids = self._classes(p_ids)
        if value_ids is not None:
            ids = torch.where(value_ids >= 0, value_ids, ids)
        values = self.value_rows(ids).to(pointer.dtype)
        first = (mixed[rows, at][:, None] @ values)[:, 0]  # (B, H)
        sel = (torch.arange(T, device=at.device)[None] == first_positions[:, None]) & (first_positions >= 0)[:, None]
        return torch.where(sel[..., None], first[:, None], pointer)


def previous_slots(valid: torch.Tensor) -> torch.Tensor:
    """(B, T_k) long: each slot's predecessor in the pointer memory (s - 1; -1 for the first), the
    slot a copy continues from unless virtual slots say otherwise (``EncoderCache.pointer_pred``)."""
    return (torch.arange(valid.shape[1], device=valid.device) - 1)[None].expand(valid.shape[0], -1)


def shifted_prev(prev: torch.Tensor) -> torch.Tensor:
    """(B, T_k): each slot's class two tokens back, read positionally from the previous slot's ``prev``."""
    return torch.cat([torch.full_like(prev[:, :1], -1), prev[:, :-1]], 1)


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
    """
    w = lm_head[ids].float()
    wg = w * (1.0 if norm_weight is None else norm_weight.float())
    d = wg @ inv_gram
    scale = (wg * w).sum(-1, keepdim=True) / (wg * d).sum(-1, keepdim=True).clamp(min=1e-6)
    return d * scale


def at_first(scores: torch.Tensor, first_positions: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(B, Tq, T_k): each item's knowledge-token ``scores`` (B, T_k) at its first position, zero
    elsewhere (and for items whose first position is -1 or outside the Tq output positions)."""
    t = torch.arange(n_positions, device=scores.device)
    at = (t[None] == first_positions[:, None]) & (first_positions >= 0)[:, None]
    return torch.where(at[..., None], scores[:, None, :], scores.new_zeros(()))
