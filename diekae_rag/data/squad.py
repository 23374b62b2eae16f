"""SQuAD-format readers (SQuAD-Shifts training files, SQuAD v1.1 dev part A for evaluation)."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Optional

from .fictional import Fact

TRAIN_FILES = ("new_wiki_v1.0.json", "nyt_v1.0.json", "reddit_v1.0.json", "amazon_reviews_v1.0.json")
DEV_FILE = "squad_v1.1_dev_part_a.json"
MAX_PASSAGE_CHARS = 900  # training items: paragraphs longer than this are left out by default


def default_data_dir() -> Path:
    """``$DIEKAE_RAG_DATA`` or ``../shared/data/squad_shifts`` or the cache made by ``diekae-rag data``."""
    env = os.environ.get("DIEKAE_RAG_DATA")
    if env:
        return Path(env)
    for cand in (Path.cwd().parent / "shared" / "data" / "squad_shifts",
                 Path(__file__).resolve().parents[3] / "shared" / "data" / "squad_shifts"):
        if cand.exists():
            return cand
    from ..defaults import cache_dir
    return cache_dir() / "data" / "squad_shifts"


def read_squad(path: str | Path, max_passage_chars: Optional[int] = None) -> list[Fact]:
    """All (context, question, first answer) items of a SQuAD v1.1-format file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found. Run `diekae-rag data` to build the SQuAD files from the "
                                "bigbench==1.0.0 source archive, or set DIEKAE_RAG_DATA.")
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    items = []
    for article in data:
        for para in article["paragraphs"]:
            ctx = para["context"]
            if max_passage_chars and len(ctx) > max_passage_chars:
                continue
            for qa in para["qas"]:
                if not qa.get("answers"):
                    continue
                ans = qa["answers"][0]["text"].strip()
                items.append(Fact(ctx, qa["question"].strip(), ans, "", "squad", article.get("title", "")))
    return items


def _kind(answer: str) -> str:
    if re.fullmatch(r"[\d,.\s]+", answer):
        return "number"
    if answer[:1].isupper():
        return "name"
    return "other"


def add_distractors(items: list[Fact], seed: int = 0) -> list[Fact]:
    """Give each item a same-kind wrong answer taken from another item."""
    rng = random.Random(seed)
    by_kind: dict[str, list[str]] = {}
    for it in items:
        by_kind.setdefault(_kind(it.answer), []).append(it.answer)
    for it in items:
        pool = by_kind[_kind(it.answer)]
        for _ in range(20):
            d = rng.choice(pool)
            if d.lower() not in it.answer.lower() and it.answer.lower() not in d.lower():
                break
        it.distractor = d
    return items


def load_squad_items(files: Iterable[str], data_dir: Optional[Path] = None, n: Optional[int] = None,
                     seed: int = 0, max_passage_chars: Optional[int] = MAX_PASSAGE_CHARS) -> list[Fact]:
    """Items from several SQuAD files, shuffled, with distractors."""
    data_dir = data_dir or default_data_dir()
    items: list[Fact] = []
    for f in files:
        items += read_squad(Path(data_dir) / f, max_passage_chars)
    rng = random.Random(seed)
    rng.shuffle(items)
    return add_distractors(items[:n] if n else items, seed)
