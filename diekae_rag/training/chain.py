"""Rebuild encoders from a committed chain of training configs: ``diekae-rag rebuild configs/shipped.json``.

A chain file lists training configs (each continuing the one before it), the answer-start
reader's configs (each also continuing the one before; a reader step's ``teacher`` may name an
earlier reader step by its config's file name), optionally the follow-up reader's (continuing the
last reader step; ``DiekaeModel.followup_reader``), and the copy settings to ship with them::

    {"steps": ["configs/shipped/1_....json", ...], "reader": ["configs/shipped/reader.json", ...],
     "followup_reader": ["configs/shipped/followup_reader.json"], "copy": {...}}

Step ``i`` writes ``OUT/<its name>`` and starts from step ``i-1``'s best checkpoint, so a chain needs
nothing that is not committed. Each step resumes where an interrupted run left off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

from ..copy import CopyConfig
from .trainer import TrainConfig
from .reader import ReaderTrainConfig


class Chain(NamedTuple):
    steps: list[TrainConfig]
    readers: list[ReaderTrainConfig]
    copy: CopyConfig
    followup_readers: list[ReaderTrainConfig]


def chain_steps(chain: str | Path, out: str | Path) -> Chain:
    """The chain's training configs (with their ``out`` and ``init_from`` set), the reader's and the
    follow-up reader's (with ``out`` and ``init`` set), and the copy settings; a step that names its own
    ``init_from``/``init`` or ``out`` is refused (the chain sets them)."""
    data = json.loads(Path(chain).read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"steps", "reader", "followup_reader", "copy"})
    if unknown or not data.get("steps"):
        raise ValueError(f"{chain}: a chain has 'steps' (training config files), 'reader', 'followup_reader' "
                         f"and 'copy'; got {sorted(data)}.")
    steps, prev = [], None
    for path in data["steps"]:
        _check_step(path, "init_from")
        cfg = TrainConfig.from_file(path)
        cfg.out = str(Path(out) / Path(path).stem)
        cfg.init_from = None if prev is None else str(Path(prev) / "best")
        steps.append(cfg)
        prev = cfg.out
    readers, prev, outs = {"reader": [], "followup_reader": []}, "", {}
    for key, configs in readers.items():  # the follow-up reader's steps continue the reader's
        paths = data.get(key) or []
        for path in [paths] if isinstance(paths, str) else paths:
            _check_step(path, "init")
            cfg = ReaderTrainConfig.from_file(path)
            cfg.out, cfg.init = str(Path(out) / Path(path).stem), prev
            cfg.teacher = outs.get(cfg.teacher, cfg.teacher)  # an earlier reader step, by its config's name
            configs.append(cfg)
            prev = outs[Path(path).stem] = cfg.out
    return Chain(steps, readers["reader"], CopyConfig.plain().replace(**data.get("copy", {})), readers["followup_reader"])


def _check_step(path: str, init_key: str) -> None:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if init_key in raw or "out" in raw:
        raise ValueError(f"{path}: a chain step must not set {init_key} or out; the chain sets them "
                         "(each step starts from the previous step's result).")


def rebuild(chain: str | Path, out: str | Path = "runs/shipped", install: bool = False) -> Path:
    """Train every step of ``chain`` in turn and the readers, then write the result (float16 encoders,
    copy.json, the readers) to ``OUT/final``, or over the package's shipped encoders with ``install``."""
    import torch

    from ..answer_reader import AnswerStartReader
    from ..checkpoint import load_encoder, save_encoder
    from ..knowledge import FOLLOWUP_READER
    from ..model import SHIPPED_WEIGHTS
    from .reader import train_reader
    from .trainer import train
    steps, readers, copy, followups = chain_steps(chain, out)
    for cfg in steps:
        print(f"== {cfg.out} (from {cfg.init_from or 'fresh encoders'})", flush=True)
        train(cfg)
    enc, _ = load_encoder(Path(steps[-1].out) / "best")
    copy.check_for(enc.config)
    target = SHIPPED_WEIGHTS if install else Path(out) / "final"
    save_encoder(enc, target, dtype=torch.float16, copy=copy)
    for cfg in readers + followups:
        print(f"== {cfg.out} (from {cfg.init or 'a fresh head on MiniLM'})", flush=True)
        train_reader(cfg)
    if readers:
        AnswerStartReader.from_pretrained(readers[-1].out).save_pretrained(target)
    if followups:
        AnswerStartReader.from_pretrained(followups[-1].out).save_pretrained(target / FOLLOWUP_READER)
    return target
