"""Train the answer-start reader (:mod:`diekae_rag.answer_reader`) on the encoders' training data.

Each item's question is paired with each of its passages; the loss is -log of the probability
(normalised jointly over every passage's word-pieces and one "no answer" slot, as at serving
time) on the word-pieces where an occurrence of the answer starts, or on "no answer" when no
passage contains it. ``data.negatives`` sets the share of items whose gold passage is left out,
so that "no answer" is learned (it is what the copy gate's ``gate_no_answer`` reads).

``separate_layers`` turns a saved reader (``init``) into one whose first layers read the passage
alone (so its passage side can be stored at index time); ``teacher`` then names a reader whose
distribution over starts (and "no answer") the new one also learns, with weight ``distill`` (a KL
term next to the gold loss), so that what the gate's threshold was chosen on carries over.
``layers`` keeps only some of ``init``'s layers (e.g. ``[0, 2, 4]``: a reader that reads in half
the time), to be distilled from ``init`` in the same way.

``joint="cross"`` turns ``init`` into a reader whose every layer reads the passage alone and whose
one cross-attention reads it against the question (:class:`~diekae_rag.answer_reader.CrossReading`),
to be distilled from ``teacher``; ``layerwise`` then weighs DeFormer's layer-wise loss on the
passage side: the mean squared distance between the states its head reads at each passage
word-piece and the teacher's last states at the same word-piece.

``same_article`` trains on every SQuAD-Shifts training question (but the held-out ones), each over its
paragraph and up to ``k - 1`` other paragraphs of the same article (:class:`SameArticle`); the share of
negatives (paragraphs of the same article without the answer, "no answer" their target) grows from 0
to ``negatives`` between the steps of ``ramp``, so that "no answer" is learned on same-topic passages
after the starts are.

A run keeps a resume point in ``out/resume`` (the reader, optimizer state and step, safetensors + JSON,
written atomically every ``eval_every`` steps): started again with the same config, it goes on from there, so a long
distillation can be run across sessions of ``max_minutes``.

``conversations`` mixes in follow-up questions read as the gate reads them, with their earlier turns
(:func:`~diekae_rag.data.followups.conversation_question`): fictional ones
(:func:`~diekae_rag.data.followups.make_followups`) and SQuAD-format ones
(:func:`~diekae_rag.data.followups.squad_followups`), half of them with a passage that holds only the
earlier turn's answer, so "no answer" is their target there. The teacher's KL leaves them out: the
teacher reads the earlier answer as the likeliest span, which is what they are there to unlearn.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from ..answer_reader import AnswerStartReader, ReaderConfig, joint_char_log_probs
from ..copy.memory import LOG_FLOOR
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
    separate_layers: Optional[int] = None  # set the reader's separate layers (None: keep init's)
    layers: Optional[list[int]] = None  # keep only these of init's layers (AnswerStartReader.keep_layers)
    teacher: str = ""        # a saved reader to distil from ("init": the one it starts from; "": the gold loss alone)
    distill: float = 1.0     # weight of the KL to the teacher
    conversations: dict = field(default_factory=dict)  # {"fictional": n, "squad": n, "k": 3, "seed": s}: follow-ups mixed in
    joint: Optional[str] = None  # "cross": make init a cross-joint reader (AnswerStartReader.to_cross); None: keep init's
    layerwise: float = 0.0       # weight of the layer-wise states loss to the teacher (needs teacher)
    same_article: dict = field(default_factory=dict)  # {"k": [1, 2, 3], "negatives": 0.4, "ramp": [a, b], "seed": s,
    #                                                   "max_passage_chars": 900 (null: every paragraph)}

    @classmethod
    def from_file(cls, path: str) -> "ReaderTrainConfig":
        return cls(**json.loads(Path(path).read_text()))


def gold_pieces(batch: dict, passages: Sequence[str], answer: str) -> torch.Tensor:
    """(W, T) bool: the passage word-pieces where an occurrence of ``answer`` starts."""
    target = answer.strip()
    hits = [{m.start() for m in re.finditer(re.escape(target), p)} if target else set()
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


def _kl_to_teacher(lg: torch.Tensor, batch: dict, target: tuple[list[dict[int, float]], float]) -> torch.Tensor:
    """KL(teacher || reader) over one item's starts, keyed by (passage, character) (the first window
    where windows overlap) and "no answer"; ``target`` is the teacher's :func:`joint_char_log_probs`."""
    index, teacher, seen = [], [], set()
    finite = torch.isfinite(lg).cpu()
    for w in range(lg.shape[0]):
        p = int(batch["pair"][w])
        for t in torch.nonzero(finite[w, 1:])[:, 0].tolist():
            key = (p, int(batch["spans"][w, t + 1, 0]))
            if key not in seen:
                seen.add(key)
                index.append(w * lg.shape[1] + t + 1)
                teacher.append(target[0][p].get(key[1], LOG_FLOOR))
    flat = torch.cat([lg.reshape(-1)[torch.tensor(index, dtype=torch.long, device=lg.device)], lg[:, 0].max()[None]])
    t = torch.log_softmax(torch.tensor(teacher + [target[1]], device=lg.device), 0)
    return (t.exp() * (t - torch.log_softmax(flat, 0))).sum()


def _states_by_piece(h: torch.Tensor, batch: dict) -> dict[tuple[int, int], torch.Tensor]:
    """{(pair, character): the state at that passage word-piece} of one item's windows (the first window's)."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    starts = batch["spans"][:, :, 0]
    for w in range(h.shape[0]):
        p = int(batch["pair"][w])
        for t in torch.nonzero(starts[w] >= 0)[:, 0].tolist():
            out.setdefault((p, int(starts[w, t])), h[w, t])
    return out


def _layerwise(h: torch.Tensor, sub: dict, t_h: torch.Tensor, t_sub: dict) -> torch.Tensor:
    """Mean squared distance between the reader's and the teacher's states at the word-pieces both read."""
    mine, theirs = _states_by_piece(h, sub), _states_by_piece(t_h, t_sub)
    both = [key for key in mine if key in theirs]
    if not both:
        return h.sum() * 0.0
    return (torch.stack([mine[k] for k in both]) - torch.stack([theirs[k] for k in both]).to(h)).pow(2).mean()


def _per_item(batch: dict, owner: torch.Tensor, i: int) -> tuple[torch.Tensor, dict]:
    sel = torch.nonzero(owner == i)[:, 0]
    return sel, {"spans": batch["spans"][sel], "pair": batch["pair"][sel] - int(batch["pair"][sel].min())}


def batch_losses(reader: AnswerStartReader, items: Sequence[Example], teacher: Optional[AnswerStartReader] = None,
                 distill: float = 1.0, taught: Optional[Sequence[bool]] = None, layerwise: float = 0.0
                 ) -> tuple[torch.Tensor, list[bool]]:
    """Per item, -log P(gold start) (plus ``distill`` × the KL to ``teacher``'s distribution and
    ``layerwise`` × the distance to its last states, on the items ``taught`` marks, default all) and
    whether its top start is a gold start. All (question, passage) pairs of the batch go through the
    reader in one forward."""
    pairs = [(ex.question, p, i) for i, ex in enumerate(items) for p in ex.passages]
    questions, passages = [q for q, _, _ in pairs], [p for _, p, _ in pairs]
    def owners(windows: dict) -> torch.Tensor:  # the item each window belongs to
        return torch.tensor([pairs[int(w)][2] for w in windows["pair"]])
    states = bool(layerwise) and teacher is not None
    start, batch = reader.read_pairs(questions, passages, hidden=states)
    owner = owners(batch)
    if teacher is not None:
        with torch.no_grad():
            t_start, t_batch = teacher.read_pairs(questions, passages, hidden=states)
        t_owner = owners(t_batch)
    losses, right = [], []
    for i, ex in enumerate(items):
        sel, sub = _per_item(batch, owner, i)
        lg = start[sel.to(start.device)]
        loss, ok = _joint_loss(lg, gold_pieces(sub, ex.passages, ex.answer).to(start.device))
        if teacher is not None and (taught is None or taught[i]):
            t_sel, t_sub = _per_item(t_batch, t_owner, i)
            target = joint_char_log_probs(t_start[t_sel.to(t_start.device)].cpu(), t_sub, len(ex.passages))
            loss = loss + distill * _kl_to_teacher(lg, sub, target)
            if states:
                loss = loss + layerwise * _layerwise(batch["hidden"][sel.to(start.device)], sub,
                                                     t_batch["hidden"][t_sel.to(t_start.device)], t_sub)
        losses.append(loss)
        right.append(ok)
    return torch.stack(losses), right


def evaluate(reader: AnswerStartReader, items: Sequence[Example], batch_size: int = 16) -> dict[str, float]:
    """Share of items whose best-scored start (over all passages and "no answer") is right."""
    was_training = reader.training
    reader.eval()
    with torch.no_grad():
        parts = [batch_losses(reader, items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    reader.train(was_training)
    return {"start": sum(sum(p[1]) for p in parts) / max(len(items), 1)}


def dev_row(reader: AnswerStartReader, dev: dict[str, list[Example]]) -> dict[str, float]:
    row = {}
    for name, items in dev.items():
        for kind, v in evaluate(reader, items).items():
            row[name if kind == "start" else f"{name}_{kind}"] = v
    return row


def dev_sets(n: int, conversations: bool = False) -> dict[str, list[Example]]:
    """Training-style items never trained on: the dev items of ``benchmarks/copy_settings.py``
    (seed 999: fictional, and SQuAD-Shifts *train* items; the SQuAD dev file stays for evaluation),
    multi-fact fictional passages, and the dev halves of the negative sets (where the right top
    start is "no answer" unless a passage happens to hold the answer). With ``conversations``, also
    the follow-ups of ``benchmarks/chat_followups.py --split dev``, read with their earlier turns:
    answered by their passage, and not (their right top start is "no answer"), fictional and SQuAD ones
    (``data.followups.followup_split``)."""
    from ..data.negatives import closed_book, unanswerable
    negative = {"closed_book_dev": closed_book("dev"), "unanswerable_dev": unanswerable("dev", n)}
    sets = {"fictional_k1": DataSpec(fictional=n, k=1, seed=999).build(),
            "fictional_multi_k3": DataSpec(fictional=n, other_facts=(1, 3), k=3, seed=998).build(),
            "squad_train_k1": DataSpec(fictional=0, squad=n, k=1, seed=999).build(),
            **{name: [Example(it.question, list(it.passages), it.answers[0], "") for it in items]
               for name, items in negative.items()}}
    if conversations:
        from ..data.followups import followup_split
        for source, name in (("fictional", "followups_k3"), ("squad", "squad_followups")):
            answering, silent = followup_split(source, "dev", n)
            sets[name], sets[name.replace("followups", "followups_silent")] = _as_read(answering), _as_read(silent)
    return sets


def _as_read(items: Sequence[Example]) -> list[Example]:
    """Conversation items with their turns joined as the reader reads them."""
    from ..data.followups import conversation_question
    return [replace(ex, question=conversation_question(ex.question)) for ex in items]


def conversation_items(spec: dict, held: set[str], data_dir=None) -> list[Example]:
    """The follow-ups ``ReaderTrainConfig.conversations`` asks for, read with their earlier turns;
    none whose questions are held out."""
    from ..data.followups import make_followups, squad_followups
    from ..data.squad import TRAIN_FILES, load_squad_items
    seed, k, half = spec.get("seed", 0), spec.get("k", 3), spec.get("fictional", 0) // 2
    items = make_followups(half, seed, k) + make_followups(spec.get("fictional", 0) - half, seed + 1, k,
                                                            answerable=False)
    if spec.get("squad"):
        facts = load_squad_items(TRAIN_FILES, data_dir, seed=seed)
        items += squad_followups(facts, spec["squad"], seed)
    items = [ex for ex in items if not any(t["content"].strip() in held for t in ex.question if t["role"] == "user")]
    return _as_read(items)


def held_out_questions(n_dev: int) -> set[str]:
    """Questions the reader must not train on: its single-question dev sets and copy_settings.py's
    (n=96), and every user turn of the dev follow-ups (its own and ``benchmarks/chat_followups.py``'s,
    150 each way and kind), which is what a training conversation is checked against."""
    from ..data.followups import followup_split
    sets = [*dev_sets(n_dev).values(), *dev_sets(96).values()]
    turns = {t["content"].strip() for source in ("fictional", "squad")
             for ex in sum(followup_split(source, "dev", max(n_dev, 150)), []) for t in ex.question if t["role"] == "user"}
    return {ex.question for d in sets for ex in d} | turns


class SameArticle:
    """Every SQuAD-Shifts training question (but ``held``; with the spec's ``max_passage_chars``, default
    900, only those of shorter paragraphs: 28,070 before the held-out ones, against 37,636 with
    ``None``), each read over its paragraph and other
    paragraphs of its article; a ``negatives(step)`` share gets only paragraphs of its article that do
    not hold its answer. Each (item, step) is drawn from its own seed, so a resumed run sees the same."""

    def __init__(self, spec: dict, held: set[str], data_dir=None) -> None:
        from ..data.squad import MAX_PASSAGE_CHARS, TRAIN_FILES, load_squad_items
        self.spec = spec
        self.facts = [f for f in load_squad_items(TRAIN_FILES, data_dir, seed=spec.get("seed", 0),
                                                  max_passage_chars=spec.get("max_passage_chars", MAX_PASSAGE_CHARS))
                      if f.question not in held]
        self.pools: dict[str, list[str]] = {}
        for f in self.facts:
            pool = self.pools.setdefault(f.subject, [])
            if f.passage not in pool:
                pool.append(f.passage)

    def __len__(self) -> int:
        return len(self.facts)

    def negatives(self, step: int) -> float:
        """The share of negatives at ``step``: 0 before ``ramp[0]``, ``negatives`` from ``ramp[1]``."""
        a, b = self.spec.get("ramp", [0, 0])
        top = self.spec.get("negatives", 0.0)
        return top if step >= b else 0.0 if step < a else top * (step - a) / max(b - a, 1)

    def example(self, i: int, step: int) -> Example:
        f = self.facts[i]
        rng = random.Random(f"{self.spec.get('seed', 0)}/{i}/{step}")
        k = rng.choice(list(self.spec.get("k", [1, 2, 3])))
        others = [p for p in self.pools[f.subject] if p != f.passage and f.answer not in p]
        negative = bool(others) and rng.random() < self.negatives(step)
        picked = rng.sample(others, min(len(others), k if negative else k - 1))
        passages = picked if negative else picked + [f.passage]
        rng.shuffle(passages)
        return Example(f.question, passages, f.answer, f.distractor, answerable=not negative)


def _what_trains(config: dict) -> dict:
    """A run's config less its time budget: a run resumed with another ``max_minutes`` is the same run."""
    return {k: v for k, v in config.items() if k != "max_minutes"}


def _load_resume(folder: Path, reader: AnswerStartReader, opt, config: dict) -> Optional[dict]:
    """The resume point in ``folder`` (its reader weights loaded into ``reader``, its optimizer state
    into ``opt``), or None; a point of another ``config`` (but for ``max_minutes``) is refused before
    anything is loaded."""
    if not (folder / "trainer.json").exists():
        return None
    from safetensors.torch import load_file
    from .trainer import _load_optimizer_state
    point = json.loads((folder / "trainer.json").read_text())
    if _what_trains(point["config"]) != _what_trains(config):
        raise ValueError(f"{folder} holds a run of another config; use another `out`, or delete {folder} "
                         "to start this one afresh.")
    state = load_file(str(folder / point["weights"]))
    reader.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    _load_optimizer_state(opt, load_file(str(folder / point["optimizer_tensors"])), point["optimizer"])
    return point


def _save_resume(folder: Path, reader: AnswerStartReader, opt, step: int, history: list, config: dict) -> None:
    """Write the resume point (safetensors + JSON): the reader's float32 weights and the optimizer's
    tensors under new names, then ``trainer.json`` naming them (last, atomically, so a run killed while
    saving resumes from the point before); then the older files go."""
    from safetensors.torch import save_file
    from ..answer_reader import FROZEN
    from ..atomic import atomic_write
    from .trainer import _optimizer_state
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in reader.state_dict().items() if not k.endswith(FROZEN)}
    tensors, meta = _optimizer_state(opt)
    names = {"weights": f"step-{step}-reader.safetensors", "optimizer_tensors": f"step-{step}-optimizer.safetensors"}
    atomic_write(folder / names["weights"], lambda tmp: save_file(weights, str(tmp)))
    atomic_write(folder / names["optimizer_tensors"], lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(folder / "trainer.json", json.dumps({"step": step, "history": history, "config": config,
                                                           "optimizer": meta, **names}))
    for old in folder.glob("step-*.safetensors"):
        if old.name not in names.values():
            old.unlink()


def train_reader(cfg: ReaderTrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.init:
        reader = AnswerStartReader.from_pretrained(cfg.init)
    else:
        reader = AnswerStartReader(ReaderConfig(max_length=cfg.max_length))
    if cfg.layers is not None:
        reader.keep_layers(cfg.layers)
    if cfg.separate_layers is not None:
        reader.config = replace(reader.config, separate_layers=cfg.separate_layers)
        reader.check_config()
    if cfg.joint == "cross" and reader.cross is None:
        reader.to_cross()
    teacher_path = cfg.init if cfg.teacher == "init" else cfg.teacher
    teacher = AnswerStartReader.from_pretrained(teacher_path).eval() if teacher_path else None
    reader.train()
    spec = DataSpec(**{**cfg.data, "other_facts": tuple(cfg.data.get("other_facts", (0, 0)))})
    items = spec.build()
    dev = dev_sets(cfg.n_dev, conversations=bool(cfg.conversations))
    held = held_out_questions(cfg.n_dev)
    items = [ex for ex in items if ex.question not in held]
    followups = conversation_items(cfg.conversations, held) if cfg.conversations else []
    articles = SameArticle(cfg.same_article, held) if cfg.same_article else None
    plain = len(items)
    # (item, taught by the teacher); an int is an index into ``articles``, drawn anew at each step
    items = [(ex, True) for ex in items] + [(ex, False) for ex in followups] + \
        [(i, True) for i in range(len(articles) if articles else 0)]
    heads = [p for n, p in reader.named_parameters() if n.split(".")[0] in ("head", "cross")]
    body = [p for n, p in reader.named_parameters() if p.requires_grad and n.split(".")[0] not in ("head", "cross")]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg.lr},
                             {"params": heads, "lr": cfg.head_lr}], weight_decay=0.01)
    steps = min(cfg.max_steps, len(items) // cfg.items_per_step)
    rng.shuffle(items)
    resume = Path(cfg.out) / "resume"
    point = _load_resume(resume, reader, opt, asdict(cfg))
    step, history = (point["step"], point["history"]) if point else (0, [{"step": 0, **dev_row(reader, dev)}])
    if point is None:
        print(json.dumps(history[-1]), flush=True)
    t0, recent = time.time(), []
    bar = tqdm(total=steps, initial=step, desc="reader")
    while step < steps and (time.time() - t0) < cfg.max_minutes * 60:
        frac = step / steps
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.head_lr)):
            g["lr"] = base * min(1.0, (step + 1) / 50) * max(0.05, 1 - frac)
        batch = [(articles.example(ex, step) if isinstance(ex, int) else ex, taught)
                 for ex, taught in items[step * cfg.items_per_step: (step + 1) * cfg.items_per_step]]
        loss = batch_losses(reader, [ex for ex, _ in batch], teacher, cfg.distill, [t for _, t in batch],
                            cfg.layerwise)[0].mean()
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
                            **({"negatives": articles.negatives(step)} if articles else {}), **dev_row(reader, dev)})
            print(json.dumps(history[-1]), flush=True)
            reader.save_pretrained(cfg.out)
            _save_resume(resume, reader, opt, step, history, asdict(cfg))
    bar.close()
    if not history or history[-1]["step"] != step:
        history.append({"step": step, "loss": sum(recent[-50:]) / max(len(recent[-50:]), 1), **dev_row(reader, dev)})
        print(json.dumps(history[-1]), flush=True)
        _save_resume(resume, reader, opt, step, history, asdict(cfg))
    reader.save_pretrained(cfg.out)
    summary = {"config": asdict(cfg), "steps": step, "of_steps": steps, "minutes": (time.time() - t0) / 60,
               "items": {"plain": plain, "conversations": len(followups), "same_article": len(articles or [])},
               "history": history}
    atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2))
    plot_history(history, Path(cfg.out) / "summary.png")
    return summary


def plot_history(history: list[dict], path: Path) -> None:
    """Dev accuracy of the reader's top start, per dev set, against training steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in [k for k in history[-1] if k not in ("step", "loss")]:
        pts = [(h["step"], h[name]) for h in history if name in h]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("top start is the answer's")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
