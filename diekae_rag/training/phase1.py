"""Phase 1: difference pretraining against a cached teacher Δ, with no decoder in the loop.

For each example the frozen decoder runs twice under no_grad: on x alone and on the
knowledge-wrapped input [K-wrapper; x]. Δ_l = m_l(x|K) - m_l(x) at x's positions is the target
for encoder l. The decoder never changes, so Δ is computed once and cached on disk in
safetensors shards; training then runs at encoder speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..atomic import atomic_write, atomic_write_text
from ..data.mixture import Example
from ..injection import capturing_mlp_outputs
from ..model import DiekaeModel


def _teacher_inputs(model: DiekaeModel, batch: Sequence[Example], per_step: bool):
    if model.config.passage_isolation:
        raise ValueError("Phase 1 does not support passage_isolation yet: train phase 1 without it, then "
                         "fine-tune with it in phase 2 (init_from + encoder.passage_isolation).")
    prompts, passages = model.prepare([e.question for e in batch], [e.passages for e in batch], "diekae")
    answers = [model.prompter.answer_ids(e.answer, True) if per_step else [] for e in batch]
    tails = [p + a for p, a in zip(prompts, answers)]
    heads = [model.prompter.knowledge_ids(p)[0] for p in passages]
    return tails, heads


@torch.no_grad()
def teacher_deltas(model: DiekaeModel, batch: Sequence[Example]) -> list[torch.Tensor]:
    """Δ for each example: (n_layers, |tail|, hidden) in fp16, tail = x (+ answer in per-step mode)."""
    cfg = model.config
    tails, heads = _teacher_inputs(model, batch, cfg.per_step)
    dec = model.decoder
    out = []
    with capturing_mlp_outputs(dec, cfg.layers) as plain:
        ids, mask = model.prompter.pad(tails, model.device, side="right")
        dec.get_decoder()(input_ids=ids, attention_mask=mask)
        plain = {l: v.clone() for l, v in plain.items()}
    with capturing_mlp_outputs(dec, cfg.layers) as cond:
        ids2, mask2 = model.prompter.pad([h + t for h, t in zip(heads, tails)], model.device, side="right")
        dec.get_decoder()(input_ids=ids2, attention_mask=mask2)
    for b, (h, t) in enumerate(zip(heads, tails)):
        d = torch.stack([cond[l][b, len(h): len(h) + len(t)] - plain[l][b, : len(t)] for l in cfg.layers])
        out.append(d.to(torch.float16).cpu())
    return out


class DeltaCache:
    """Teacher Δ on disk: one safetensors shard per ``shard_size`` examples, resumable."""

    def __init__(self, folder: str | Path, shard_size: int = 256) -> None:
        self.folder = Path(folder)
        self.shard_size = shard_size

    def _shard(self, i: int) -> Path:
        return self.folder / f"delta-{i:05d}.safetensors"

    def build(self, model: DiekaeModel, examples: Sequence[Example], batch_size: int = 16) -> None:
        """Compute missing shards (a finished shard is never recomputed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "meta.json", json.dumps(
            {"n": len(examples), "shard_size": self.shard_size, "layers": model.config.layers,
             "per_step": model.config.per_step}))
        n_shards = (len(examples) + self.shard_size - 1) // self.shard_size
        for s in tqdm(range(n_shards), desc="teacher Δ shards"):
            if self._shard(s).exists():
                continue
            chunk = examples[s * self.shard_size: (s + 1) * self.shard_size]
            tensors = {}
            for i in range(0, len(chunk), batch_size):
                for j, d in enumerate(teacher_deltas(model, chunk[i: i + batch_size])):
                    tensors[str(s * self.shard_size + i + j)] = d.contiguous()
            atomic_write(self._shard(s), lambda tmp: save_file(tensors, str(tmp)))

    def load(self, n: int) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for s in range((n + self.shard_size - 1) // self.shard_size):
            out.update({int(k): v for k, v in load_file(str(self._shard(s))).items()})
        return [out[i] for i in range(n)]


def difference_loss(model: DiekaeModel, batch: Sequence[Example], deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_l MSE(E_l rows at the tail positions, Δ_l), summed over hidden, averaged over positions."""
    cfg = model.config
    tails, _ = _teacher_inputs(model, batch, cfg.per_step)
    passages = [e.passages for e in batch]
    items = [model.prompter.encoder_item(p, t) for p, t in zip(passages, tails)]
    enc_batch = model.prompter.encoder_batch(items, model.device)
    rows = model.encoder(enc_batch.input_ids, enc_batch.attention_mask).rows
    total, count = rows.new_zeros(()), 0
    for b, d in enumerate(deltas):
        off = int(enc_batch.x_offset[b])
        r = rows[:, b, off: off + d.shape[1]].float()
        total = total + ((r - d.to(r.device).float()) ** 2).sum(-1).sum(0).sum()
        count += d.shape[1]
    return total / max(count, 1)
