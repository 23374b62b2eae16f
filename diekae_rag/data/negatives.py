"""Evaluation sets where the passages do not answer: does DIEKÆ do no harm?

``closed_book``: general-knowledge questions that the bare decoder answers right, each asked with
the 3 NYT paragraphs (SQuAD-Shifts) the retriever's MiniLM ranks nearest, none of which holds an
accepted answer. Built once by ``benchmarks/build_closed_book.py`` into ``closed_book.json`` (in
this package), with a dev half for choosing settings and an eval half for reporting.

``unanswerable``: SQuAD questions with the k=5 passages the retriever ranks nearest, their own
paragraph removed: dev A for evaluation, SQuAD-Shifts training files for dev.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CLOSED_BOOK = Path(__file__).parent / "closed_book.json"
SPLITS = ("dev", "eval")


@dataclass
class NegativeItem:
    question: str
    passages: list[str]
    answers: list[str] = field(default_factory=list)  # what a right answer contains (any of them)


def split_of(question: str) -> str:
    """``dev`` or ``eval``, by a hash of the question (stable across runs and machines)."""
    return SPLITS[int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % 2]


def closed_book(split: str = "eval", n: Optional[int] = None) -> list[NegativeItem]:
    """The built ``closed_book`` items of one split (see :func:`build_closed_book`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not CLOSED_BOOK.exists():
        raise FileNotFoundError(f"{CLOSED_BOOK} is missing: run `python benchmarks/build_closed_book.py`.")
    items = [NegativeItem(x["question"], x["passages"], x["answers"])
             for x in json.loads(CLOSED_BOOK.read_text(encoding="utf-8"))["items"] if x["split"] == split]
    return items[:n] if n else items


def build_closed_book(known: Sequence[tuple[str, list[str]]], corpus: Sequence[str], canary: str, k: int = 3) -> dict:
    """``known`` (question, accepted answers) pairs with each question's ``k`` nearest ``corpus``
    passages that hold none of its answers as a whole word (MiniLM + FAISS, as the product retrieves);
    a question with fewer than ``k`` such passages among its 64 nearest is left out."""
    from ..text import normalize
    from ..retrievers import Embedder
    from ..retrievers.store import build_index
    emb = Embedder()
    index = build_index(emb.encode(list(corpus)), "flat")
    _, hits = index.search(emb.encode([q for q, _ in known]), 64)

    def holds(passage: str, answers: list[str]) -> bool:
        text = f" {normalize(passage)} "
        return any(f" {normalize(a)} " in text for a in answers)
    items = []
    for (q, answers), row in zip(known, hits):
        kept = [corpus[j] for j in row if j >= 0 and not holds(corpus[j], answers)][:k]
        if len(kept) == k:
            items.append({"question": q, "answers": answers, "passages": kept, "split": split_of(q)})
    return {"canary": canary, "k": k, "items": items}


def unanswerable(split: str = "eval", n: int = 60, k: int = 5, seed: int = 1234) -> list[NegativeItem]:
    """SQuAD questions with the ``k`` passages nearest to each, its own paragraph left out: dev A's
    first ``n`` items (the eval sets' order) for ``eval``; SQuAD-Shifts training items for ``dev``."""
    from .distractors import retrieved_distractors
    from .squad import DEV_FILE, TRAIN_FILES, load_squad_items
    if split == "eval":
        items = load_squad_items([DEV_FILE], seed=seed)
        pool, chosen = sorted({it.passage for it in items[:2000]}), items[:n]
    elif split == "dev":
        items = load_squad_items(TRAIN_FILES, seed=999)
        pool, chosen = sorted({it.passage for it in items[:2000]}), items[:n]
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    mined = retrieved_distractors([it.question for it in chosen], [it.passage for it in chosen], pool, k)
    return [NegativeItem(it.question, ps, [it.answer]) for it, ps in zip(chosen, mined)]
