"""The training loop behind ``diekae-rag train``: config file in, encoder checkpoint out.

Checkpoints hold the encoders plus the optimiser state (safetensors + JSON), so a run can be
resumed; the best checkpoint on the dev split is kept in ``out/best`` and training stops
early when the dev loss stops improving.

Several GPUs: start the same command with ``accelerate launch --multi_gpu --num_processes N -m
diekae_rag.cli train CONFIG.json`` (several CPU processes: ``torchrun --nproc_per_node N -m
diekae_rag.cli train CONFIG.json``). Each process holds the frozen decoder
and the encoders, takes 1/N of every batch, and the encoders' gradients are averaged through
Accelerate before each optimiser step, so N processes train the same run as one with the same
global ``batch_size``; only the main process writes checkpoints and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..atomic import atomic_directory, atomic_write_text
from ..checkpoint import read_config, save_encoder
from ..config import EncoderConfig
from ..copy.config import FORMAT1_NAMES, CopyConfig
from ..data.mixture import DataSpec
from ..injection import decoder_layers
from ..model import DiekaeModel
from .phase1 import DeltaCache, difference_loss
from .phase2 import lm_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run. ``phase`` is 1 (difference, cached Δ) or 2 (LM loss)."""

    out: str = "runs/default"
    encoder: dict = field(default_factory=dict)   # EncoderConfig fields
    copy: dict = field(default_factory=dict)      # CopyConfig fields to train with (default: the model's own)
    data: dict = field(default_factory=dict)      # DataSpec fields
    phase: int = 2
    init_from: Optional[str] = None                # start from this encoder checkpoint
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    batch_size: int = 32
    epochs: float = 1.0
    max_minutes: Optional[float] = None
    dev_size: int = 64
    eval_every: int = 50
    patience: int = 4
    seed: int = 0
    decoder: Optional[str] = None
    first_token_weight: float = 1.0                # phase 2: weight of each answer's first token (dev loss: 1)
    negative_weight: float = 1.0                   # phase 2: weight of the KL to the bare decoder on data.negatives items
    negative_first_only: bool = False              # phase 2: that KL at each negative item's first answer token only
    # Train only parameters whose names start with one of these (e.g. ["copy_head."]); None: all.
    trainable: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if not self.first_token_weight > 0:
            raise ValueError(f"first_token_weight must be a positive number, got {self.first_token_weight!r}.")
        if not self.negative_weight > 0:
            raise ValueError(f"negative_weight must be a positive number, got {self.negative_weight!r}; "
                             "to train without negative items, set data.negatives to 0.")
        # A config written for format-1 checkpoints set copy settings among the encoder's fields.
        for old, new in FORMAT1_NAMES.items():
            if old in self.encoder:
                self.copy.setdefault(new, self.encoder.pop(old))
        CopyConfig.plain().replace(**self.copy)  # an unknown or invalid copy setting fails here, before training

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown keys in {path}: {sorted(unknown)}")
        return cls(**data)


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": opt.state_dict()["param_groups"], "state": {}}
    for pid, st in opt.state_dict()["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    opt.load_state_dict({"param_groups": meta["param_groups"], "state": state})


def save_training_state(model: DiekaeModel, opt, step: int, best: float, folder: Path) -> None:
    tensors, meta = _optimizer_state(opt)
    with atomic_directory(folder) as tmp:
        save_encoder(model.encoder, tmp, copy=model.copy)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "best_dev": best, "optimizer": meta}))


def lr_at(step: int, total: int, base: float, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 0 by the last step or the time budget, whichever comes first."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total - warmup), time_fraction)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Processes:
    """One process, or several started by ``accelerate launch`` / ``torchrun`` (through Accelerate)."""

    def __init__(self) -> None:
        self.acc = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator
            self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0
        self.device = self.acc.device if self.acc else None

    def main_first(self) -> contextlib.AbstractContextManager:
        """The main process runs the block first (decoder conversion, data mining), then the others."""
        return self.acc.main_process_first() if self.acc else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()

    def shard(self, idx: list[int]) -> list[int]:
        """This process's share of a batch (every process gets at least one item)."""
        return idx[self.rank::self.world] or idx[:1]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.acc:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.acc.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduction="mean")
        i = 0
        for p, g in zip(params, grads):
            p.grad = flat[i: i + g.numel()].view_as(p).to(p.dtype)
            i += g.numel()

    def agree(self, value: float, reduction: str, device: torch.device) -> float:
        """One value for all processes (``max`` elapsed time, ``mean`` dev loss), so every process
        sets the same LR and stops, saves and early-stops at the same step."""
        if not self.acc:
            return value
        if reduction == "max":  # accelerate reduces by sum or mean only
            return float(self.acc.gather(torch.tensor([value], device=device)).max())
        return float(self.acc.reduce(torch.tensor([value], device=device), reduction=reduction)[0])


def split_examples(cfg: TrainConfig) -> tuple[list, list]:
    """The run's (dev, train) examples: the first ``dev_size`` items of its data are the dev split."""
    examples = DataSpec(**cfg.data).build()
    return examples[: cfg.dev_size], examples[cfg.dev_size:]


def mean_batch_loss(loss_of: Callable[[list[int]], torch.Tensor], n: int, batch_size: int) -> float:
    """Mean over batches of ``loss_of(indices)`` for items 0..n-1, without gradients (the dev loss)."""
    with torch.no_grad():
        losses = [float(loss_of(list(range(i, min(i + batch_size, n))))) for i in range(0, n, batch_size)]
    return sum(losses) / max(len(losses), 1)


def trainable_parameters(model: DiekaeModel, prefixes: Optional[list[str]]) -> list[torch.nn.Parameter]:
    """The encoder parameters to train: all, or those named with one of ``prefixes`` (the rest frozen)."""
    named = list(model.encoder.named_parameters())
    if prefixes is None:
        return [p for _, p in named if p.requires_grad]
    chosen = [p for name, p in named if any(name.startswith(x) for x in prefixes)]
    if not chosen:
        raise ValueError(f"trainable {prefixes} names no encoder parameter; names start with e.g. "
                         f"{sorted({n.split('.')[0] for n, _ in named})}.")
    for name, p in named:
        p.requires_grad_(any(name.startswith(x) for x in prefixes))
    return chosen


def build_model(cfg: TrainConfig, device: Optional[torch.device] = None) -> DiekaeModel:
    if cfg.init_from:
        model = DiekaeModel.from_pretrained(cfg.init_from, decoder=cfg.decoder, device=device)
        moved = "layers" in cfg.encoder and list(cfg.encoder["layers"]) != list(model.config.layers)
        if moved:
            if len(cfg.encoder["layers"]) != len(model.config.layers):
                raise ValueError(f"init_from {cfg.init_from} has {len(model.config.layers)} injection layers, the "
                                 f"config asks for {len(cfg.encoder['layers'])}: rows can move, not change in number.")
            model.config.layers = list(cfg.encoder["layers"])
            model.config.validate(len(decoder_layers(model.decoder)))
            with torch.no_grad():  # trunks and pointer are kept; rows restart from zero at their new layers
                model.encoder.up.weight.zero_()
            log.warning("Moved the injection rows of %s to layers %s (up-projections zeroed).",
                        cfg.init_from, model.config.layers)
        for key, value in cfg.encoder.items():  # behaviour switches only; shapes must match
            if key in ("layers", "d_enc", "n_blocks", "n_heads", "pointer_layer", "pointer_heads", "pointer_key_dim"):
                if getattr(model.config, key) != value:
                    raise ValueError(f"init_from {cfg.init_from} has {key}={getattr(model.config, key)}, "
                                     f"the config asks for {value}: shapes must match to continue training.")
            setattr(model.config, key, value)
        model.config.validate()
        if model.config.pointer_match:
            model.encoder.add_pointer_match()  # a new match weight starts at zero: exactly where init_from is
    else:
        model = DiekaeModel.from_pretrained(Path(cfg.out) / "last" if (Path(cfg.out) / "last").exists() else None,
                                            decoder=cfg.decoder, config=EncoderConfig(**cfg.encoder), device=device)
    # Train in fp32 master weights; bf16 autocast on CUDA.
    model.encoder.float().train()
    return model


def train(cfg: TrainConfig, model: Optional[DiekaeModel] = None) -> dict:
    """Run (or resume) a training run; returns a summary dict also written to ``out/summary.json``."""
    torch.manual_seed(cfg.seed)
    procs = _Processes()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if procs.is_main:
        atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    with procs.main_first():
        if model is None:
            model = build_model(cfg, procs.device)
        if cfg.copy:  # the readout to train with (saved with the checkpoints as copy.json)
            model.copy = model.copy.replace(**cfg.copy)
            model.copy.check_for(model.config)
        dev, train_set = split_examples(cfg)
    model.encoder.float().train()
    if not train_set:
        raise ValueError("No training examples left after the dev split; raise the data counts.")
    params = trainable_parameters(model, cfg.trainable)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    step, best = 0, float("inf")
    resume = out / "last"
    if (resume / "trainer_state.json").exists():
        st = json.loads((resume / "trainer_state.json").read_text())
        _load_optimizer_state(opt, load_file(str(resume / "optimizer.safetensors")), st["optimizer"])
        step, best = st["step"], st["best_dev"]
        log.warning("Resuming %s at step %d (best dev %.4f).", out, step, best)

    deltas = dev_deltas = None
    if cfg.phase == 1:
        cache = DeltaCache(out / "delta_cache")
        if procs.is_main:
            cache.build(model, examples)
        procs.barrier()
        all_d = cache.load(len(examples))
        dev_deltas, deltas = all_d[: cfg.dev_size], all_d[cfg.dev_size:]

    def loss_fn(batch_idx, split):
        batch = [split[i] for i in batch_idx]
        if cfg.phase == 1:
            d = dev_deltas if split is dev else deltas
            return difference_loss(model, batch, [d[i] for i in batch_idx])
        # The dev loss stays unweighted (NLL, and KL on negative items), comparable across runs.
        if split is dev:
            return lm_loss(model, batch)
        return lm_loss(model, batch, first_token_weight=cfg.first_token_weight, negative_weight=cfg.negative_weight,
                       negative_first_only=cfg.negative_first_only)

    def dev_loss() -> float:
        model.encoder.eval()
        loss = mean_batch_loss(lambda idx: loss_fn(idx, dev), len(dev), cfg.batch_size)
        model.encoder.train()
        return loss

    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = int(steps_per_epoch * cfg.epochs)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    t0, bad, history = time.time(), 0, []
    amp = autocast_for(model.device)
    bar = tqdm(total=total, initial=step, desc=f"phase {cfg.phase}", disable=not procs.is_main)
    while step < total:
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train_set)), len(train_set))
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        elapsed = procs.agree(time.time() - t0, "max", model.device)
        time_fraction = elapsed / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps, time_fraction)
        with amp:
            loss = loss_fn(procs.shard(idx), train_set)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        procs.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        timed_out = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
        if step % cfg.eval_every == 0 or step == total or timed_out:
            dl = procs.agree(dev_loss(), "mean", model.device)
            history.append({"step": step, "train_loss": loss.item(), "dev_loss": dl, "minutes": (time.time() - t0) / 60})
            log.info("step %d dev %.4f", step, dl)
            if dl < best:
                best, bad = dl, 0
                if procs.is_main:
                    with atomic_directory(out / "best") as tmp:
                        save_encoder(model.encoder, tmp, copy=model.copy)
            else:
                bad += 1
            if procs.is_main:
                save_training_state(model, opt, step, best, out / "last")
            procs.barrier()
            if bad >= cfg.patience:
                log.warning("Early stop at step %d: dev loss has not improved for %d evaluations.", step, bad)
                break
        if timed_out:
            break
    bar.close()
    summary = {"steps": step, "best_dev": best, "minutes": (time.time() - t0) / 60, "history": history,
               "device": str(model.device), "processes": procs.world, "n_train": len(train_set)}
    prev = out / "summary.json"
    if prev.exists():
        summary["history"] = json.loads(prev.read_text()).get("history", []) + history
    if procs.is_main:
        atomic_write_text(prev, json.dumps(summary, indent=2))
    procs.barrier()
    return summary


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (encoders keep fp32 master weights); nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def best_checkpoint(out: str | Path) -> Path:
    p = Path(out) / "best"
    read_config(p)
    return p
