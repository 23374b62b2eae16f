"""Assemble training / evaluation examples: (question, passages, answer, wrong answer)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .distractors import retrieved_distractors
from .fictional import Fact, make_facts
from .squad import DEV_FILE, TRAIN_FILES, load_squad_items


@dataclass
class Example:
    question: Union[str, list[dict]]   # a question, or a conversation's turns ending with one
    passages: list[str]
    answer: str
    distractor: str
    relation: str = ""
    answerable: bool = True   # False: the passages do not hold the answer (a negative item)


DISTRACTORS = ("random", "retrieved")


def without_answer(passage: str, answer: str) -> Optional[str]:
    """``passage`` with every sentence that holds ``answer`` removed, or None when nothing else is
    left (or the answer still is)."""
    target = answer.strip()
    if not target:
        return None
    kept = [s for s in re.split(r"(?<=[.!?])\s+", passage) if target not in s]
    cut = " ".join(kept).strip()
    return cut if cut and target not in cut and cut != passage.strip() else None


def retrieval_style(items: list[Fact], k: Union[int, Sequence[int]], seed: int = 0,
                    pool: Optional[list[str]] = None, distractors: str = "random",
                    negatives: float = 0.0, cut_answer: float = 0.0) -> list[Example]:
    """Put each gold passage among ``k-1`` distractor passages, shuffled.

    A ``negatives`` share of the items gets ``k`` distractors and no gold passage: passages that
    do not answer (same-topic ones with ``"retrieved"``), for learning when not to copy. A
    ``cut_answer`` share of those keeps its gold passage with the sentences that hold the answer
    removed (:func:`without_answer`) in place of one distractor: the same paragraph, on topic,
    that no longer answers.

    ``distractors="random"`` draws them from other items' passages; ``"retrieved"`` takes the
    passages of ``pool`` nearest to the question (MiniLM + FAISS, as the product's retriever
    ranks them), i.e. the hard negatives a RAG app actually feeds the decoder.
    ``k`` may be a list: each item then gets a k drawn from it (a mix of easy and hard items).
    """
    if distractors not in DISTRACTORS:
        raise ValueError(f"distractors must be one of {DISTRACTORS}, got {distractors!r}.")
    rng = random.Random(seed)
    pool = pool or sorted({it.passage for it in items})
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be a positive number of passages (or a list of them), got {k!r}.")
    if not 0 <= negatives <= 1:
        raise ValueError(f"negatives is a share of the items, between 0 and 1; got {negatives!r}.")
    most = max(ks) if negatives else max(ks) - 1
    mined = None
    if distractors == "retrieved" and most > 0:
        mined = retrieved_distractors([it.question for it in items], [it.passage for it in items], pool, most)
    neg_rng = random.Random(seed + 1)  # the same items get gold passages whatever ``negatives`` is
    cut_rng = random.Random(seed + 2)
    out = []
    for i, it in enumerate(items):
        n = ks[0] if len(ks) == 1 else rng.choice(ks)
        negative = negatives > 0 and neg_rng.random() < negatives
        n_other = n if negative else n - 1
        others = mined[i][:n_other] if mined else []
        while len(others) < n_other and len(pool) > n:
            p = rng.choice(pool)
            if p != it.passage and p not in others:
                others.append(p)
        passages = others + ([] if negative else [it.passage])
        cut = without_answer(it.passage, it.answer) if negative and cut_rng.random() < cut_answer else None
        if cut is not None:
            passages = passages[:n - 1] + [cut]
        rng.shuffle(passages)
        out.append(Example(it.question, passages, it.answer, it.distractor, it.relation, answerable=not negative))
    return out


@dataclass
class DataSpec:
    """What to train or evaluate on. Counts of 0 leave a source out."""

    fictional: int = 4000
    other_facts: tuple[int, int] = (0, 0)
    squad: int = 0
    k: Union[int, list[int]] = 1
    distractors: str = "random"   # or "retrieved": the question's nearest passages (FAISS)
    seed: int = 0
    negatives: float = 0.0        # share of items whose passages do not hold the gold passage
    cut_answer: float = 0.0       # share of those given their gold passage less its answer's sentences
    squad_files: list[str] = field(default_factory=lambda: list(TRAIN_FILES))

    def build(self, data_dir=None) -> list[Example]:
        if DEV_FILE in self.squad_files:
            raise ValueError(f"{DEV_FILE} is for evaluation only; never train on it.")
        items: list[Fact] = []
        if self.fictional:
            items += make_facts(self.fictional, seed=self.seed, relations="train", other_facts=tuple(self.other_facts))
        if self.squad:
            items += load_squad_items(self.squad_files, data_dir, n=self.squad, seed=self.seed)
        rng = random.Random(self.seed)
        rng.shuffle(items)
        return retrieval_style(items, self.k, seed=self.seed, distractors=self.distractors,
                               negatives=self.negatives, cut_answer=self.cut_answer)


def eval_sets(n: int = 100, k: int = 1, seed: int = 1234, data_dir=None, other_facts=(0, 0),
              squad: bool = True, distractors: str = "random") -> dict[str, list[Example]]:
    """The held-out evaluation sets: fictional (unseen names, seen / unseen relations) and SQuAD dev A.

    With ``distractors="retrieved"`` the fictional distractors come from a pool of 1,000
    generated passages (the first ``n`` are the items, the same as with random distractors)
    and SQuAD's from the first 2,000 dev items' passages, nearest to the question first.
    """
    sets = {}
    for name, s, rel in (("fictional_seen", seed, "train"), ("fictional_unseen", seed + 1, "held_out")):
        facts = make_facts(n if distractors == "random" else max(n, 1000), seed=s, relations=rel,
                           other_facts=other_facts)
        sets[name] = retrieval_style(facts[:n], k, seed, pool=sorted({f.passage for f in facts}),
                                     distractors=distractors)
    if squad:
        items = load_squad_items([DEV_FILE], data_dir, seed=seed)
        sets["squad_dev"] = retrieval_style(items[:n], k, seed, pool=sorted({it.passage for it in items[:2000]}),
                                            distractors=distractors)
    return sets
