"""Train the answer-start reader (:mod:`diekae_rag.answer_reader`) on the encoders' training data.

Each item's question is paired with each of its passages; the loss is -log of the probability
(normalised jointly over every passage's word-pieces and one "no answer" slot, as at serving
time) on the word-pieces where an occurrence of the answer starts, or on "no answer" when no
passage contains it.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..answer_reader import AnswerStartReader, ReaderConfig
from ..atomic import atomic_write_text
from ..data.mixture import DataSpec, Example


@dataclass
class ReaderTrainConfig:
    out: str = "runs/reader"
    data: dict = field(default_factory=lambda: dict(fictional=6000, other_facts=(0, 3), squad=12000, k=[1, 2],
                                                    distractors="random", seed=21))
    items_per_step: int = 8
    lr: float = 1e-4
    head_lr: float = 1e-3
    max_minutes: float = 30.0
    max_steps: int = 100000
    n_dev: int = 200
    eval_every: int = 200
    max_length: int = 256
    seed: int = 0
    init: str = ""           # a saved reader to start from ("" = a fresh head on MiniLM)
    end_head: bool = False   # also train an end head (where the answer ends)

    @classmethod
    def from_file(cls, path: str) -> "ReaderTrainConfig":
        return cls(**json.loads(Path(path).read_text()))


def gold_pieces(batch: dict, passages: Sequence[str], answer: str, side: int = 0) -> torch.Tensor:
    """(W, T) bool: the passage word-pieces where an occurrence of ``answer`` starts (``side`` 0)
    or ends (1)."""
    target = answer.strip()
    hits = [{(m.start() if side == 0 else m.end() - 1) for m in re.finditer(re.escape(target), p)} if target else set()
            for p in passages]
    spans = batch["spans"]
    gold = torch.zeros(spans.shape[:2], dtype=torch.bool)
    for w in range(spans.shape[0]):
        h = hits[int(batch["pair"][w])]
        if h:
            gold[w] = torch.tensor([int(a) >= 0 and any(a <= c < b for c in h) for a, b in spans[w].tolist()])
    return gold


def _joint_loss(lg: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """-log P(gold) over one item's windows (every passage word-piece and one "no answer" slot,
    which is gold when no passage holds the answer), and whether the top piece is gold."""
    flat = torch.cat([lg[:, 1:].reshape(-1), lg[:, 0].max()[None]])
    g = torch.cat([gold[:, 1:].reshape(-1), (~gold.any())[None].to(gold.device)])
    return -torch.logsumexp(torch.log_softmax(flat, 0)[g], 0), bool(g[int(flat.argmax())])


def batch_losses(reader: AnswerStartReader, items: Sequence[Example]
                 ) -> tuple[torch.Tensor, list[bool], list[bool]]:
    """Per item, -log P(gold start) (plus -log P(gold end) with an end head), whether its top
    start is a gold start, and whether its top end is a gold end (all False without an end head).
    All (question, passage) pairs of the batch go through the reader in one forward."""
    pairs = [(ex.question, p, i) for i, ex in enumerate(items) for p in ex.passages]
    batch = reader.windows([q for q, _, _ in pairs], [p for _, p, _ in pairs])
    start, end = reader.logits(batch)
    owner = torch.tensor([pairs[int(w)][2] for w in batch["pair"]])
    losses, right, right_end = [], [], []
    for i, ex in enumerate(items):
        sel = torch.nonzero(owner == i)[:, 0]
        sub = {"spans": batch["spans"][sel], "pair": batch["pair"][sel] - int(batch["pair"][sel].min())}
        rows = sel.to(start.device)
        loss, ok = _joint_loss(start[rows], gold_pieces(sub, ex.passages, ex.answer, 0).to(start.device))
        ok_end = False
        if end is not None:
            end_loss, ok_end = _joint_loss(end[rows], gold_pieces(sub, ex.passages, ex.answer, 1).to(end.device))
            loss = loss + end_loss
        losses.append(loss)
        right.append(ok)
        right_end.append(ok_end)
    return torch.stack(losses), right, right_end


def evaluate(reader: AnswerStartReader, items: Sequence[Example], batch_size: int = 16) -> dict[str, float]:
    """Share of items whose best-scored start (over all passages and "no answer") is right, and
    with an end head the same for the best-scored end."""
    reader.eval()
    with torch.no_grad():
        parts = [batch_losses(reader, items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    reader.train()
    n = max(len(items), 1)
    out = {"start": sum(sum(p[1]) for p in parts) / n}
    if reader.end_head is not None:
        out["end"] = sum(sum(p[2]) for p in parts) / n
    return out


def _dev_row(reader: AnswerStartReader, dev: dict[str, list[Example]]) -> dict[str, float]:
    row = {}
    for name, items in dev.items():
        for kind, v in evaluate(reader, items).items():
            row[name if kind == "start" else f"{name}_{kind}"] = v
    return row


def dev_sets(n: int) -> dict[str, list[Example]]:
    """Training-style items never trained on: the dev items of ``benchmarks/pointer_settings.py``
    (seed 999: fictional, and SQuAD-Shifts *train* items; the SQuAD dev file stays for evaluation)
    and multi-fact fictional passages."""
    return {"fictional_k1": DataSpec(fictional=n, k=1, seed=999).build(),
            "fictional_multi_k3": DataSpec(fictional=n, other_facts=(1, 3), k=3, seed=998).build(),
            "squad_train_k1": DataSpec(fictional=0, squad=n, k=1, seed=999).build()}


def held_out_questions(n_dev: int) -> set[str]:
    """Questions the reader must not train on: its dev sets and pointer_settings.py's (n=96)."""
    sets = [*dev_sets(n_dev).values(), *dev_sets(96).values()]
    return {ex.question for d in sets for ex in d}


def train_reader(cfg: ReaderTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.init:
        reader = AnswerStartReader.from_pretrained(cfg.init, end_head=cfg.end_head)
    else:
        reader = AnswerStartReader(ReaderConfig(max_length=cfg.max_length, end_head=cfg.end_head))
    reader.train()
    spec = DataSpec(**{**cfg.data, "other_facts": tuple(cfg.data.get("other_facts", (0, 0)))})
    items = spec.build()
    dev = dev_sets(cfg.n_dev)
    held = held_out_questions(cfg.n_dev)
    items = [ex for ex in items if ex.question not in held]
    heads = [p for n, p in reader.named_parameters() if n.split(".")[0] in ("head", "end_head")]
    body = [p for n, p in reader.named_parameters() if p.requires_grad and n.split(".")[0] not in ("head", "end_head")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                             {"params": heads, "lr": cfg.head_lr}], weight_decay=0.01)
    steps = min(cfg.max_steps, len(items) // cfg.items_per_step)
    history = [{"step": 0, **_dev_row(reader, dev)}]
    print(json.dumps(history[-1]), flush=True)
    t0, step, recent = time.time(), 0, []
    bar = tqdm(total=steps, desc="reader")
    rng.shuffle(items)
    while step < steps and (time.time() - t0) < cfg.max_minutes * 60:
        frac = step / steps
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.head_lr)):
            g["lr"] = base * min(1.0, (step + 1) / 50) * max(0.05, 1 - frac)
        batch = items[step * cfg.items_per_step: (step + 1) * cfg.items_per_step]
        loss = batch_losses(reader, batch)[0].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body, 1.0)
        opt.step()
        step += 1
        recent.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=sum(recent[-50:]) / len(recent[-50:]))
        if step % cfg.eval_every == 0:
            history.append({"step": step, "loss": sum(recent[-50:]) / len(recent[-50:]),
                            **_dev_row(reader, dev)})
            print(json.dumps(history[-1]), flush=True)
            reader.save_pretrained(cfg.out)
    bar.close()
    history.append({"step": step, "loss": sum(recent[-50:]) / max(len(recent[-50:]), 1),
                    **_dev_row(reader, dev)})
    print(json.dumps(history[-1]), flush=True)
    reader.save_pretrained(cfg.out)
    summary = {"config": asdict(cfg), "steps": step, "minutes": (time.time() - t0) / 60, "history": history}
    atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2))
    plot_history(history, Path(cfg.out) / "summary.png")
    return summary


def plot_history(history: list[dict], path: Path) -> None:
    """Dev accuracy of the reader's top start, per dev set, against training steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in [k for k in history[0] if k != "step"]:
        ax.plot([h["step"] for h in history], [h[name] for h in history], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("top start (_end: end) is the answer's")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
