"""Passage isolation: encode each passage on its own, cache its encoder states, reuse them.

With ``passage_isolation`` the encoders' input is a list of *segments* (the knowledge prefix,
then separator+passage for each passage), each attending only within itself with its own
positions, followed by a *tail* (suffix, eos, prompt, answer so far) that attends to all of it.
A segment's states therefore do not depend on the other passages or on the question, so they
are computed once per passage (at index time with :meth:`DiekaeModel.precompute`, or on first
use) and at query time only the tail runs through the encoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .encoder import DiekaeEncoder, EncoderCache
from .keys import segment_key
from .lru import LRU


@dataclass(frozen=True)
class Int4States:
    """Keys or values as an int4 store keeps them (two values a byte, a float16 scale a channel), held
    so in memory and unpacked only where :func:`assemble` copies them: a quarter of float16's memory."""

    q4: torch.Tensor     # (..., L, C // 2) uint8: value + 8 of channel 2j in the low nibble, of 2j + 1 in the high
    scale: torch.Tensor  # (..., 1, C) float16
    requires_grad = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.q4.shape[:-1], 2 * self.q4.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.q4.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what it unpacks to unless asked otherwise

    def head(self, n: int) -> "Int4States":
        """The first ``n`` tokens (their scales are the segment's)."""
        return Int4States(self.q4[..., :n, :], self.scale)

    def unpack_into(self, out: torch.Tensor) -> torch.Tensor:
        """Write the values, (q - 8) * scale, into ``out`` (a float tensor of :attr:`shape`)."""
        pairs = out.unflatten(-1, (-1, 2))
        pairs[..., 0] = self.q4 & 15
        pairs[..., 1] = self.q4 >> 4
        return out.sub_(8).mul_(self.scale.to(out.dtype))

    def unpack(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.unpack_into(torch.empty(self.shape, dtype=dtype, device=self.device))


@dataclass(frozen=True)
class SegmentState:
    ids: torch.Tensor                      # (L,)
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per block: (n, h, L, hd) each (or Int4States)
    pointer_keys: Optional[torch.Tensor]   # (ph, L, dk): the copy memory's keys
    knowledge: torch.Tensor                # (L,) bool: copyable passage tokens


def encode_segments(encoder: DiekaeEncoder, segments: Sequence[Sequence[int]], kmasks: Sequence[Sequence[bool]],
                    device: torch.device) -> list[SegmentState]:
    """Encode segments independently (one padded batch) and split the states per segment."""
    if not segments:
        return []
    L = max(len(s) for s in segments)
    S = len(segments)
    ids = torch.zeros((S, L), dtype=torch.long)
    valid = torch.zeros((S, L), dtype=torch.bool)
    km = torch.zeros((S, L), dtype=torch.bool)
    for i, (s, k) in enumerate(zip(segments, kmasks)):
        ids[i, L - len(s):], valid[i, L - len(s):], km[i, L - len(s):] = torch.tensor(s), True, torch.tensor(k)
    ids, valid, km = ids.to(device), valid.to(device), km.to(device)
    out = encoder(ids, valid, use_cache=True, output_start=L)  # states only, no rows
    # unbind, not c.kv[..][:, i]: under autograd each indexed view would back-propagate through a
    # zero tensor of the whole batch (quadratic in the number of segments); unbind's backward is one stack.
    per_seg_kv = [(k.unbind(1), v.unbind(1)) for k, v in out.cache.kv]
    per_seg_pk = encoder.copy_head.keys(out.states).unbind(0) if encoder.copy_head is not None else None
    states = []
    for i, s in enumerate(segments):
        a = L - len(s)
        kv = tuple((k[i][:, :, a:], v[i][:, :, a:]) for k, v in per_seg_kv)
        pk = per_seg_pk[i][:, a:] if per_seg_pk is not None else None
        states.append(SegmentState(ids[i, a:], kv, pk, km[i, a:]))
    return states


def _left_padded(parts: Sequence[Sequence[torch.Tensor]], length: int, dim: int, stack_dim: int,
                 room: int = 0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Each item's ``parts`` side by side along ``dim``, left-padded with zeros to ``length`` and
    stacked at ``stack_dim``. Without gradients every part is copied once, into one buffer of ``dtype``
    (default: the first part's) with ``room`` spare positions after ``length`` along ``dim`` (left out
    of the view returned), so :func:`~diekae_rag.encoder.append_kv` extends it in place; under
    autograd it is cat, pad and stack, with no in-place writes, so training through it stays cheap."""
    if torch.is_grad_enabled() and any(t.requires_grad for ts in parts for t in ts):  # (never Int4States)
        padded = []
        for ts in parts:
            t = torch.cat(list(ts), dim)
            padded.append(F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [length - t.shape[dim], 0]))
        return torch.stack(padded, stack_dim)
    first = parts[0][0]
    shape = list(first.shape)
    shape[dim] = length + room
    shape.insert(stack_dim, len(parts))
    out = torch.empty(shape, dtype=dtype or first.dtype, device=first.device).narrow(dim + (stack_dim <= dim), 0, length)
    for b, ts in enumerate(parts):
        row = out.select(stack_dim, b)
        at = length - sum(t.shape[dim] for t in ts)
        row.narrow(dim, 0, at).zero_()
        for t in ts:
            part = row.narrow(dim, at, t.shape[dim])
            t.unpack_into(part) if isinstance(t, Int4States) else part.copy_(t)
            at += t.shape[dim]
    return out


class Assembled(NamedTuple):
    """Each item's segment states side by side, left-padded: the encoders' past for the tail, and the
    knowledge tokens' ids, copyable mask (B, P) and copy keys (B, heads, P, dk; None without a readout)."""
    cache: EncoderCache
    ids: torch.Tensor
    knowledge: torch.Tensor
    keys: Optional[torch.Tensor]


def assemble(items: Sequence[Sequence[SegmentState]], room: int = 0, dtype: Optional[torch.dtype] = None) -> Assembled:
    """Concatenate each item's segment states into a left-padded past for the tail, with ``room``
    positions to spare in the keys and values for the tail and the decode steps to be appended in place.
    ``dtype``: the encoders' (states read from a store stay in its float type until copied here)."""
    lens = [sum(int(s.ids.shape[0]) for s in segs) for segs in items]
    P = max(lens)
    first = items[0][0]
    kv = [tuple(_left_padded([[s.kv[blk][i] for s in segs] for segs in items], P, 2, 1, room, dtype) for i in (0, 1))
          for blk in range(len(first.kv))]  # (n, B, h, P, hd) each
    key_valid = _left_padded([[torch.ones(n, dtype=torch.bool, device=first.ids.device)] for n in lens], P, 0, 0)
    ids = _left_padded([[s.ids for s in segs] for segs in items], P, 0, 0)
    knowledge = _left_padded([[s.knowledge for s in segs] for segs in items], P, 0, 0)
    keys = None
    if first.pointer_keys is not None:
        keys = _left_padded([[s.pointer_keys for s in segs] for segs in items], P, 1, 0, dtype=dtype)
    cache = EncoderCache(kv=kv, key_valid=key_valid, next_position=torch.tensor(lens, device=ids.device))
    return Assembled(cache, ids, knowledge & key_valid, keys)


def head_of(state: SegmentState, n: int) -> SegmentState:
    """The states of a segment's first ``n`` tokens."""
    kv = tuple(tuple(t.head(n) if isinstance(t, Int4States) else t[:, :, :n] for t in kv) for kv in state.kv)
    pk = state.pointer_keys[:, :n] if state.pointer_keys is not None else None
    return SegmentState(state.ids[:n], kv, pk, state.knowledge[:n])


def weights_version(encoder: DiekaeEncoder) -> int:
    """A number that changes whenever the encoder's weights are changed in place."""
    return sum(p._version for p in encoder.parameters())


class PassageCache:
    """A thread-safe LRU of segment states, valid for one set of encoder weights, over an optional
    on-disk store of states computed at index time (:mod:`diekae_rag.state_store`)."""

    def __init__(self, max_segments: int = 128) -> None:
        self._kept = LRU(max_segments)
        self.hits = self.misses = self.stored = self.cut = 0
        self.backing = None            # a PassageStateStore
        self._backing_for = None       # (id, weights version) of the encoder it was attached for

    def attach(self, store, encoder: DiekaeEncoder) -> None:
        """Read segments missing from memory from ``store`` (states of ``encoder``'s current weights)."""
        self.backing, self._backing_for = store, (id(encoder), weights_version(encoder))

    @property
    def max_segments(self) -> int:
        """How many segments are kept (0: none, every call encodes its passages)."""
        return self._kept.max_items

    @max_segments.setter
    def max_segments(self, n: int) -> None:
        self._kept.max_items = n
        self._kept.put_many([])  # drop what no longer fits

    def states(self, encoder: DiekaeEncoder, segments: Sequence[Sequence[int]], kmasks: Sequence[Sequence[bool]],
               device: torch.device, wholes: Optional[Sequence[Optional[tuple]]] = None) -> list[SegmentState]:
        """States for ``segments``; cached ones are reused when encoder weights are unchanged
        and gradients are off (training always recomputes). ``wholes[i]``: (ids, kmask) of the whole
        segment that segment ``i`` is the head of (a passage cut by the knowledge budget), or None;
        where the whole's states are kept or stored and the segment's are not, they are its first
        positions (the encoders are causal and a segment has positions of its own)."""
        use_cache = ((self.max_segments > 0 or self.backing is not None) and not torch.is_grad_enabled()
                     and not encoder.training)
        if not use_cache:
            return encode_segments(encoder, segments, kmasks, device)
        version = (id(encoder), weights_version(encoder))
        keys = [(version, tuple(s), tuple(k)) for s, k in zip(segments, kmasks)]
        found = self._kept.get_many(keys)
        self.hits += sum(key in found for key in keys)
        todo = list(dict.fromkeys(key for key in keys if key not in found))
        if todo:
            found.update(self._read_stored(encoder, todo, device))
            todo = [key for key in todo if key not in found]
        if todo and wholes is not None:
            heads = {key: (version, tuple(w[0]), tuple(w[1])) for key, w in zip(keys, wholes) if w is not None and key in todo}
            if heads:
                whole = self._kept_or_stored(encoder, list(dict.fromkeys(heads.values())), device)
                cut = [(key, head_of(whole[w], len(key[1]))) for key, w in heads.items() if w in whole]
                found.update(cut)
                self._kept.put_many(cut)
                self.cut += len(cut)
                todo = [key for key in todo if key not in found]
        self.misses += len(todo)
        if todo:
            new = encode_segments(encoder, [k[1] for k in todo], [k[2] for k in todo], device)
            found.update(zip(todo, new))
            self._kept.put_many(zip(todo, new))
        return [found[key] for key in keys]

    def _kept_or_stored(self, encoder: DiekaeEncoder, keys: Sequence[tuple], device: torch.device) -> dict:
        """The states of those ``keys`` ((weights version, ids, kmask)) kept in memory or in the store."""
        found = self._kept.get_many(keys)
        found.update(self._read_stored(encoder, [key for key in dict.fromkeys(keys) if key not in found], device))
        return found

    def _read_stored(self, encoder: DiekaeEncoder, keys: Sequence[tuple], device: torch.device) -> dict:
        """The states of those ``keys`` that the store holds for these weights, kept in memory from now on."""
        if not keys or self.backing is None or self._backing_for != (id(encoder), weights_version(encoder)):
            return {}
        names = {key: segment_key(key[1], key[2]) for key in keys}
        stored = self.backing.get_many(names.values(), device, None)  # cast by assemble
        read = [(key, stored[names[key]]) for key in keys if names[key] in stored]
        self._kept.put_many(read)
        self.stored += len(read)
        return dict(read)

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
