"""Conversation follow-ups: a second question that names no one, about what the first turn named.

Turn 1 asks one fact about an invented subject and the assistant gives the gold answer; turn 2 asks
another fact about the same subject as "that person" / "that place". The subject's passage holds both
facts (``answerable``) or only the first (not ``answerable``: the follow-up's passages do not answer),
among ``k - 1`` other subjects' passages. Single-turn sets never change with this; only the reading of
earlier turns (``CopyConfig.question_turns``) does.
"""

from __future__ import annotations

import random
from typing import Sequence

from .fictional import RELATIONS, Fact, Relation, _fact, person, place
from .mixture import Example

STAND_INS = {person: "that person", place: "that place"}
SPLIT_SEEDS = {"dev": 1001, "eval": 2002}  # make_followups seeds: answering at the seed, not answering at seed + 1


def _pairs() -> list[tuple[Relation, Relation]]:
    return [(a, b) for a in RELATIONS for b in RELATIONS
            if a is not b and a.subject is b.subject and a.subject in STAND_INS]


def make_followups(n: int, seed: int, k: int = 3, answerable: bool = True) -> list[Example]:
    """``n`` conversations (``Example.question`` is the list of turns) with ``k`` passages each."""
    rng = random.Random(seed)
    pairs = _pairs()
    convs = []
    for _ in range(n):
        first, second = rng.choice(pairs)
        s, a1, _, sent1 = _fact(rng, first)
        _, a2, d2, sent2 = _fact(rng, second, subject=s)
        filler = _fact(rng, rng.choice(RELATIONS))[3]  # a fact about someone else, in the subject's passage
        sentences = [sent1, sent2, filler] if answerable else [sent1, filler]
        rng.shuffle(sentences)
        turns = [{"role": "user", "content": rng.choice(first.questions).format(s=s)},
                 {"role": "assistant", "content": f"{a1}."},
                 {"role": "user", "content": rng.choice(second.questions).format(s=STAND_INS[first.subject])}]
        convs.append((turns, " ".join(sentences), a2, d2, second.name))
    out = []
    for i, (turns, passage, answer, distractor, relation) in enumerate(convs):
        others = [convs[j][1] for j in rng.sample([j for j in range(n) if j != i], min(k - 1, n - 1))]
        passages = others + [passage]
        rng.shuffle(passages)
        out.append(Example(turns, passages, answer, distractor, relation, answerable))
    return out


def conversation_question(turns: Sequence[dict], n: int = 3) -> str:
    """A conversation's last ``n`` turns joined as one question, as the reader and the gate read it with
    ``CopyConfig.question_turns`` = ``n`` ("Who founded Calgra? Orvel Tann. Where is it?")."""
    return " ".join(t["content"].strip() for t in turns[-n:] if t["content"].strip())


def squad_followups(facts: Sequence[Fact], n: int, seed: int) -> list[Example]:
    """Up to ``n`` two-question conversations over SQuAD-format items, one passage each: turn 1 asks
    one question of the passage and gives its answer; turn 2 asks another. Half of them answer turn
    2 (another question of the same paragraph), half do not (a question of another paragraph of the
    same article, whose answer the passage lacks: the answer to turn 1 is there, the one asked is not)."""
    rng = random.Random(seed)
    by_passage: dict[str, list[Fact]] = {}
    by_title: dict[str, list[Fact]] = {}
    for f in facts:
        by_passage.setdefault(f.passage, []).append(f)
        by_title.setdefault(f.subject, []).append(f)  # SQuAD items: subject is the article title
    passages = sorted(by_passage)
    rng.shuffle(passages)
    out = []
    for i, passage in enumerate(passages):
        if len(out) >= n:
            break
        first = rng.choice(by_passage[passage])
        answerable = i % 2 == 0
        pool = by_passage[passage] if answerable else [f for f in by_title.get(first.subject, [])
                                                          if f.passage != passage]
        pool = [f for f in pool if f.question != first.question and f.answer.lower() not in first.answer.lower()
                and first.answer.lower() not in f.answer.lower() and (f.answer in passage) == answerable]
        if not pool:
            continue
        second = rng.choice(pool)
        turns = [{"role": "user", "content": first.question}, {"role": "assistant", "content": f"{first.answer}."},
                 {"role": "user", "content": second.question}]
        out.append(Example(turns, [passage], second.answer, first.answer, "squad_followup", answerable))
    return out


def followup_split(source: str, split: str, n: int, k: int = 3) -> tuple[list[Example], list[Example]]:
    """``n`` conversations of a split (``SPLIT_SEEDS``) whose passages answer the follow-up, and ``n``
    whose passages do not: fictional ones (``make_followups``, ``k`` passages), or SQuAD ones
    (``squad_followups``, one passage; from the SQuAD-Shifts training files for ``dev`` and the SQuAD
    dev file for ``eval``)."""
    seed = SPLIT_SEEDS[split]
    if source == "fictional":
        return make_followups(n, seed, k), make_followups(n, seed + 1, k, answerable=False)
    if source != "squad":
        raise ValueError(f"source must be 'fictional' or 'squad', got {source!r}.")
    from .squad import DEV_FILE, TRAIN_FILES, load_squad_items
    facts = load_squad_items(TRAIN_FILES if split == "dev" else [DEV_FILE], seed=seed)
    items = squad_followups(facts, 4 * n, seed)
    answering, silent = [e for e in items if e.answerable][:n], [e for e in items if not e.answerable][:n]
    if min(len(answering), len(silent)) < n:
        raise ValueError(f"only {len(answering)} / {len(silent)} SQuAD follow-ups of each kind; ask for fewer.")
    return answering, silent
