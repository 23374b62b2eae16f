"""Passage states on disk: what the encoders compute for a chunk at index time, kept with the index.

Passage isolation makes a passage's encoder states (its segment's key/value cache in every encoder
block, its copy keys, its token ids) depend on nothing but the passage, so they are computed once,
when the chunk is indexed, and read back at query time instead of being recomputed. On disk, in one
folder (usually ``STORE_DIR/states`` beside the FAISS index):

    manifest.json            {"format", "encoder", "dtype", "shards": [...], "count", "bytes"}
    shard-<n>.safetensors    the states of a batch of segments, memory-mapped when read

A segment's tensors are named ``<key>/<part>``, where the key is a hash of its token ids and its
copyable-token mask, so the same text finds its states whichever retriever returned it. A passage's
sentence vector (the passage prior's MiniLM embedding) is kept as ``text-<hash of the text>/vec``, and
the answer-start reader's passage side (with ``separate_layers``) as ``read-<hash of the reader's
fingerprint and the text>/{h,m,s}``, so that another reader simply finds none; what the copy needs
of a text's tokens (spans, first pieces, answer pieces) as ``tok-<hash of the text>/...``, so a query
does not tokenise an indexed passage again. ``encoder``
is a hash of the encoder weights: states from other weights are refused with the command that
rebuilds them. New segments go into a new shard (temp file, fsync, rename), then the manifest is
replaced atomically, so a crash leaves the previous manifest pointing at complete shards.

``dtype``: ``int4`` (default: two values a byte, one float16 scale per channel of a segment; about
4 KB a knowledge token, a quarter of float16), ``float16``, ``float32`` or ``int8`` (one float16 scale
per vector). Under int8 and int4 only the encoders' keys and values are quantised: the copy keys stay
float16 (``keys_dtype`` in the manifest), as the copy's scores are sharp enough that int4 copy keys
changed answers and int4 keys and values did not (docs/results.md, "Stored states"). A manifest
without ``keys_dtype`` holds copy keys in its ``dtype``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .atomic import atomic_write, atomic_write_text
from .encoder import DiekaeEncoder
from .keys import reader_key, segment_key, text_key, tokens_key
from .passage_cache import Int4States, SegmentState

FORMAT = "diekae-rag-states/1"
DTYPES = ("float16", "float32", "int8", "int4")
QUANTISED = ("int8", "int4")  # integer dtypes: values and a float16 scale
DEFAULT_DTYPE = "int4"  # a new store's (docs/results.md, "Stored states": no dev answer changed against float16)


def keys_dtype(dtype: str) -> str:
    """How a store of ``dtype`` keeps the copy keys: float16 under an integer dtype, else ``dtype``."""
    return "float16" if dtype in QUANTISED else dtype


class StateStoreError(ValueError):
    """Stored passage states are missing, corrupt or were computed by other encoder weights."""


def encoder_hash(encoder: DiekaeEncoder) -> str:
    """A hash of the encoder's weights and shape (what its passage states depend on)."""
    h = hashlib.sha256(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _is_segment(key: str) -> bool:
    return not key.startswith(("text-", "read-", "tok-"))


def _pack(t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    t = t.detach().to("cpu", torch.float32).contiguous()
    if dtype == "int8":
        scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
        return {"q": torch.round(t / scale).to(torch.int8), "s": scale.to(torch.float16)}
    if dtype == "int4":  # tensors are (..., tokens, channels): one scale per channel over the tokens
        if t.dim() < 2 or t.shape[-1] % 2:
            raise ValueError(f"int4 states need (..., tokens, channels) tensors with an even number of channels, "
                             f"got shape {tuple(t.shape)}; store them as int8 or float16.")
        scale = t.abs().amax(-2, keepdim=True).clamp_min(1e-8) / 7
        q = (torch.round(t / scale).clamp(-7, 7) + 8).to(torch.uint8)
        return {"q4": (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous(), "s": scale.to(torch.float16)}
    return {"x": t.to(getattr(torch, dtype))}


def _unpack(get, name: str, stored: str, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """A stored tensor in ``dtype``; ``None``: as stored if a float type, float16 from int8 and int4
    (their rounding to float16 is far below the quantisation step)."""
    if stored == "int8":
        return (get(f"{name}.q").to(torch.float32) * get(f"{name}.s").to(torch.float32)).to(dtype or torch.float16)
    if stored == "int4":
        return Int4States(get(f"{name}.q4"), get(f"{name}.s")).unpack(torch.float32).to(dtype or torch.float16)
    x = get(f"{name}.x")
    return x if dtype is None else x.to(dtype)


class PassageStateStore:
    """Segment states on disk for one set of encoder weights (see the module docstring)."""

    def __init__(self, folder: str | Path, encoder: DiekaeEncoder, dtype: Optional[str] = None,
                 create: bool = True) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
        self.folder = Path(folder)
        self.encoder_sha = encoder_hash(encoder)
        self.dtype = dtype or DEFAULT_DTYPE
        self.keys_dtype = keys_dtype(self.dtype)
        self._lock = threading.Lock()
        self._where: dict[str, str] = {}   # segment key -> shard file
        self._open: dict[str, object] = {}
        self._shards: list[str] = []
        self.bytes = 0
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            self._load(manifest)
            if dtype is not None and dtype != self.dtype:
                raise StateStoreError(f"The passage states in {self.folder} are stored as {self.dtype}, not {dtype}; "
                                      f"pass dtype={self.dtype!r}, or delete {self.folder} to rebuild them as {dtype}.")
        elif not create:
            raise StateStoreError(f"No passage states at {self.folder}: {manifest} is missing.")

    def _load(self, manifest: Path) -> None:
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StateStoreError(f"{manifest} is corrupt ({exc}). Delete {self.folder} and rebuild the states.") from exc
        if m.get("format") != FORMAT:
            raise StateStoreError(f"{manifest} is not a {FORMAT} manifest.")
        if m["encoder"] != self.encoder_sha:
            raise StateStoreError(
                f"The passage states in {self.folder} were computed by other encoder weights ({m['encoder']}, "
                f"these are {self.encoder_sha}). Rebuild them: delete {self.folder} and run "
                "`diekae-rag index DOCS STORE_DIR` (or open_or_build(docs, store_dir, model=model)).")
        self.dtype, self._shards, self.bytes = m["dtype"], list(m["shards"]), int(m.get("bytes", 0))
        self.keys_dtype = m.get("keys_dtype", self.dtype)
        for shard in self._shards:
            path = self.folder / shard
            if not path.exists():
                raise StateStoreError(f"{path} is missing (listed in {manifest}). Delete {self.folder} and rebuild.")
            for key in m["keys"][shard]:
                self._where[key] = shard

    def __len__(self) -> int:
        """How many segments have stored states."""
        return sum(map(_is_segment, self._where))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get_many(self, keys: Iterable[str], device: torch.device, dtype: Optional[torch.dtype] = torch.float32
                 ) -> dict[str, SegmentState]:
        """The stored states of those ``keys`` that are stored (memory-mapped shards; tensors are
        copied to ``device`` and ``dtype``; ``None``: kept in the stored float type, float16 from
        int8, packed from int4 (:class:`~diekae_rag.passage_cache.Int4States`), for
        :func:`~diekae_rag.passage_cache.assemble` to cast or unpack as it copies them)."""
        out = {}
        for key in keys:
            shard = self._where.get(key)
            if shard is None or key in out:
                continue
            f = self._shard(shard)
            get = lambda name, f=f: f.get_tensor(f"{key}/{name}")  # noqa: E731
            n_blocks = int(get("n_blocks").item())
            if self.dtype == "int4" and dtype is None:  # kept packed, unpacked as they are assembled
                kv = tuple((Int4States(get(f"k{b}.q4").to(device), get(f"k{b}.s").to(device)),
                            Int4States(get(f"v{b}.q4").to(device), get(f"v{b}.s").to(device))) for b in range(n_blocks))
            else:
                kv = tuple((_unpack(get, f"k{b}", self.dtype, dtype).to(device),
                            _unpack(get, f"v{b}", self.dtype, dtype).to(device)) for b in range(n_blocks))
            has_keys = bool(get("has_keys").item())
            pk = _unpack(get, "pk", self.keys_dtype, dtype).to(device) if has_keys else None
            out[key] = SegmentState(get("ids").to(device, torch.long), kv, pk, get("km").to(device, torch.bool))
        return out

    def vectors(self, texts: Sequence[str]) -> dict:
        """The stored sentence vectors (the passage prior's) of those ``texts`` that have one."""
        out = {}
        for text in texts:
            key = text_key(text)
            shard = self._where.get(key)
            if shard is not None:
                out[text] = self._shard(shard).get_tensor(f"{key}/vec").numpy()
        return out

    def reader_sides(self, texts: Sequence[str], fingerprint: str) -> dict:
        """The stored answer-reader passage sides (:class:`~diekae_rag.answer_reader.PassageSide`) of
        those ``texts`` that have one for the reader with this ``fingerprint``."""
        from .answer_reader import PassageSide
        out = {}
        for text in texts:
            key = reader_key(text, fingerprint)
            shard = self._where.get(key)
            if shard is not None:
                f = self._shard(shard)
                get = lambda name, f=f: f.get_tensor(f"{key}/{name}")  # noqa: E731
                out[text] = PassageSide(_unpack(get, "h", self.dtype, torch.float32), get("m"), get("s"))
        return out

    def passage_tokens(self, texts: Sequence[str]) -> dict:
        """The stored token records (:class:`~diekae_rag.copy.pieces.TokenRecord`) of those ``texts``
        that have one."""
        from .copy.pieces import TokenRecord
        out = {}
        for text in texts:
            key = tokens_key(text)
            shard = self._where.get(key)
            if shard is not None:
                f = self._shard(shard)
                out[text] = TokenRecord.from_tensors({n: f.get_tensor(f"{key}/{n}") for n in TokenRecord.FIELDS})
        return out

    def _shard(self, name: str):
        """A shard's memory-mapped reader, opened once."""
        from safetensors import safe_open
        with self._lock:
            f = self._open.get(name)
            if f is None:
                f = self._open[name] = safe_open(str(self.folder / name), framework="pt")
        return f

    def add(self, states: dict[str, SegmentState], vectors: Optional[dict] = None, sides: Optional[dict] = None,
            reader: str = "", tokens: Optional[dict] = None) -> int:
        """Write the states of new segments (and passage texts' sentence vectors, their
        answer-reader ``sides`` for the reader with fingerprint ``reader``, and their token records)
        as one new shard, then the manifest; returns how many segments were added."""
        from safetensors.torch import save_file
        new = {k: s for k, s in states.items() if k not in self._where}
        vecs = {text_key(t): v for t, v in (vectors or {}).items() if text_key(t) not in self._where}
        reads = {reader_key(t, reader): s for t, s in (sides or {}).items() if reader_key(t, reader) not in self._where}
        toks = {tokens_key(t): r for t, r in (tokens or {}).items() if tokens_key(t) not in self._where}
        if not new and not vecs and not reads and not toks:
            return 0
        tensors: dict[str, torch.Tensor] = {f"{k}/vec": torch.as_tensor(v, dtype=torch.float32).contiguous()
                                            for k, v in vecs.items()}
        for key, record in toks.items():
            tensors.update({f"{key}/{n}": t for n, t in record.to_tensors().items()})
        for key, side in reads.items():
            tensors.update({f"{key}/h.{x}": y for x, y in _pack(side.hidden, self.dtype).items()})
            tensors[f"{key}/m"] = side.mask.to("cpu", torch.bool).contiguous()
            tensors[f"{key}/s"] = side.spans.to("cpu", torch.int32).contiguous()
        for key, s in new.items():
            tensors[f"{key}/ids"] = s.ids.to("cpu", torch.int32).contiguous()
            tensors[f"{key}/km"] = s.knowledge.to("cpu", torch.bool).contiguous()
            tensors[f"{key}/n_blocks"] = torch.tensor(len(s.kv))
            tensors[f"{key}/has_keys"] = torch.tensor(s.pointer_keys is not None)
            for b, (k, v) in enumerate(s.kv):
                for part, t in (("k", k), ("v", v)):
                    tensors.update({f"{key}/{part}{b}.{x}": y for x, y in _pack(t, self.dtype).items()})
            if s.pointer_keys is not None:
                tensors.update({f"{key}/pk.{x}": y for x, y in _pack(s.pointer_keys, self.keys_dtype).items()})
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            shard = f"shard-{len(self._shards):05d}.safetensors"
            atomic_write(self.folder / shard, lambda tmp: save_file(tensors, str(tmp)))
            self.bytes += (self.folder / shard).stat().st_size
            self._shards.append(shard)
            self._where.update({k: shard for k in [*new, *vecs, *reads, *toks]})
            keys: dict[str, list[str]] = {s: [] for s in self._shards}
            for k, s in self._where.items():
                keys[s].append(k)
            atomic_write_text(self.folder / "manifest.json", json.dumps(
                {"format": FORMAT, "encoder": self.encoder_sha, "dtype": self.dtype, "keys_dtype": self.keys_dtype,
                 "shards": self._shards,
                 "count": len(self), "bytes": self.bytes, "keys": keys}))
        return len(new)

    def knowledge_tokens(self) -> int:
        """How many passage tokens have stored states (read from the manifest's shards)."""
        from safetensors import safe_open
        total = 0
        for shard in self._shards:
            with safe_open(str(self.folder / shard), framework="pt") as f:
                total += sum(f.get_slice(n).get_shape()[0] for n in f.keys() if n.endswith("/ids") and _is_segment(n))
        return total


def states_folder(store_dir: str | Path) -> Path:
    """Where a FAISS store keeps its passage states."""
    return Path(store_dir) / "states"


__all__ = ["PassageStateStore", "StateStoreError", "encoder_hash", "segment_key", "text_key", "reader_key", "tokens_key",
           "states_folder", "DTYPES", "DEFAULT_DTYPE"]
