"""Scores from outside the encoders, per memory slot: the passage prior and the answer-start reader.

The encoders compute each passage's keys from the passage alone (so passages can be cached), so
the keys cannot know the question. A :class:`ScoreProvider` reads the question against the
passages and gives one score per slot: the passage prior at every position (which passage the
question is about), the reader at the answer's first position (where in it the answer starts).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from ..lru import LRU
from .config import CopyConfig
from .memory import LOG_FLOOR, KnowledgeLayout, token_log_probs


class ScoreProvider(Protocol):
    """One score per memory slot for each (question, passages) item, or None when it has none;
    added at every position, or with ``at_first`` at the answer's first position only."""

    at_first: bool

    def slot_scores(self, questions: Sequence[str], passages: Sequence[Sequence[str]], layout: KnowledgeLayout,
                    copy: CopyConfig, device: torch.device) -> Optional[torch.Tensor]:
        """(B, layout.width) scores, 0 outside the passages."""


class PassagePrior:
    """Which retrieved passage the question is about, from the retriever's own sentence embedder.

    Every token of passage ``i`` gets ``strength * (cos(question, passage_i) - max_j cos(question,
    passage_j))``: 0 for the passage nearest the question, negative for the others (a log softmax of
    the cosines at temperature ``1 / strength``, shifted so the best passage gets 0). The strength is
    ``CopyConfig.passage_prior``. ``embedder``: anything with ``encode(texts) -> (n, dim)`` unit
    vectors (default: the retriever's MiniLM, loaded on first use)."""

    at_first = False

    def __init__(self, embedder=None, max_cached: int = 4096) -> None:
        self._embedder = embedder
        self._vectors = LRU(max_cached)  # passage text -> unit vector
        self.stored = None  # passage texts -> vectors kept on disk (a PassageStateStore's vectors())

    @property
    def embedder(self):
        if self._embedder is None:
            from diekae_rag.retrievers.embeddings import Embedder
            self._embedder = Embedder()
        return self._embedder

    def __call__(self, questions: Sequence[str], passages: Sequence[Sequence[str]], strength: float
                 ) -> list[list[float]]:
        """For each question, one log prior per passage (0 for the nearest; [] without passages)."""
        if not strength > 0:
            raise ValueError(f"The passage prior's strength must be positive, got {strength!r}.")
        multi = [len(ps) > 1 for ps in passages]  # one passage: no choice, nothing to embed
        cos = self.cosines([q for q, m in zip(questions, multi) if m], [ps for ps, m in zip(passages, multi) if m])
        out = []
        for ps, m in zip(passages, multi):
            if m:
                c = cos.pop(0)
                out.append([float(x) for x in strength * (c - c.max())])
            else:
                out.append([0.0] * len(ps))
        return out

    def cosines(self, questions: Sequence[str], passages: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """For each question, its cosine to each of its passages (passage vectors cached)."""
        if not questions:
            return []
        embed = getattr(self.embedder, "encode_queries", self.embedder.encode)  # the retriever's question vector, if kept
        qv = embed(list(questions))
        pv = self.passage_vectors([p for ps in passages for p in ps])
        return [np.stack([pv[p] for p in ps]) @ q if ps else np.zeros(0, dtype=np.float32)
                for q, ps in zip(qv, passages)]

    def passage_vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Unit vectors of ``texts``, embedding only those not kept (e.g. at index time)."""
        found = self._vectors.get_many(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo and self.stored is not None:
            read = self.stored(todo)
            found.update(read)
            self._vectors.put_many(read.items())
            todo = [t for t in todo if t not in read]
        if todo:
            new = self.embedder.encode(todo)
            found.update(zip(todo, new))
            self._vectors.put_many(zip(todo, new))
        return found

    def clear(self) -> None:
        self._vectors.clear()

    def slot_scores(self, questions, passages, layout, copy, device):
        if not copy.passage_prior or not any(len(p) > 1 for p in passages):
            return None
        priors = self(questions, passages, copy.passage_prior)
        values = [[[pr] * len(spans) for pr, (_, spans) in zip(item, per)] for item, per in zip(priors, layout.items)]
        return layout.rows(values, 0.0, torch.float32, device)


class ReaderScores:
    """The answer-start reader (:class:`diekae_rag.answer_reader.AnswerStartReader`) as slot scores:
    ``reader_weight`` × its log P(answer starts at this token), shifted so that each item's best
    token gets 0 (the others are pushed down, none up)."""

    at_first = True

    def __init__(self, reader) -> None:
        self.reader = reader

    def slot_scores(self, questions, passages, layout, copy, device):
        if not copy.reader_weight:
            return None
        lps = [self.reader.char_log_probs(q, ps) if ps else [] for q, ps in zip(questions, passages)]
        if copy.start_merge:
            lps = [[merged_starts(lp, p, copy.start_merge) for lp, p in zip(item, ps)]
                   for item, ps in zip(lps, passages)]
        values = [[token_log_probs(lp, spans) for lp, (_, spans) in zip(lps[b], per)]
                  for b, per in enumerate(layout.items)]
        rows = layout.rows(values, float("nan"), None, device)
        best = torch.nan_to_num(rows, nan=-math.inf).amax(1, keepdim=True).clamp(min=LOG_FLOOR)
        return copy.reader_weight * torch.nan_to_num(rows - best, nan=0.0)


_BREAK = re.compile(r"[.,;:!?()\[\]\"\n]")


def merged_starts(char_lp: Mapping[int, float], text: str, min_p: float, max_words: int = 2) -> dict[int, float]:
    """The reader's ``{character offset: log P(start)}`` for one passage with nearby starts read as one
    answer: starts of probability at least ``min_p`` whose text between holds at most ``max_words``
    words and no punctuation form a group, and the group's likeliest start gets the group's summed
    probability (the others keep theirs). A start-only reader splits an answer's mass between its
    first words ("the Merrow Guild": 0.16 on "the", 0.36 on "Merrow"), so another answer with 0.38
    would win; summed, this one does."""
    floor = math.log(min_p)
    starts = sorted(c for c, v in char_lp.items() if v >= floor)
    groups: list[list[int]] = []
    for c in starts:
        between = text[groups[-1][-1]: c] if groups else ""
        if groups and not _BREAK.search(between) and len(between.split()) <= max_words:
            groups[-1].append(c)
        else:
            groups.append([c])
    out = dict(char_lp)
    for group in groups:
        if len(group) > 1:
            best = max(group, key=lambda c: char_lp[c])
            out[best] = math.log(sum(math.exp(char_lp[c]) for c in group))
    return out


class NearPassagesRead:
    """An answer-start reader that reads only the passages whose cosine to the question lies within
    ``margin`` of the best passage's (``CopyConfig.reader_margin``; ``cosines(question, passages)``: the
    passage prior's). The others get no start ({}: the copy gives them the floor), and "no answer" is
    normalised over the passages read, so the gate judges those alone."""

    def __init__(self, reader, cosines: Callable[[str, Sequence[str]], np.ndarray], margin: float) -> None:
        self.reader, self.cosines, self.margin = reader, cosines, margin

    def char_log_probs(self, question: str, passages: Sequence[str]) -> list[dict[int, float]]:
        return self._read(question, passages)[0]

    def no_answer_log_prob(self, question: str, passages: Sequence[str], nulls: str = "max") -> float:
        return self._read(question, passages, nulls)[1]

    def near(self, question: str, passages: Sequence[str]) -> list[int]:
        """Which passages it reads."""
        if len(passages) < 2:
            return list(range(len(passages)))
        cos = np.asarray(self.cosines(question, passages))
        return [i for i, c in enumerate(cos) if c >= cos.max() - self.margin]

    def _read(self, question: str, passages: Sequence[str], nulls: str = "max"
              ) -> tuple[list[dict[int, float]], float]:
        near = self.near(question, passages)
        read = [passages[i] for i in near]
        lps, null = self.reader.char_log_probs(question, read), self.reader.no_answer_log_prob(question, read, nulls)
        out: list[dict[int, float]] = [{} for _ in passages]
        for i, lp in zip(near, lps):
            out[i] = lp
        return out, null


class FollowupsRead:
    """Two answer-start readers as one: questions read with earlier turns (the keys of ``given``) go to
    ``followups``, a reader trained on conversations, and every other question to ``single``."""

    def __init__(self, single, followups, given: Mapping[str, Sequence[str]]) -> None:
        self.single, self.followups, self.given = single, followups, given

    def reader_of(self, question: str):
        return self.followups if question in self.given else self.single

    def char_log_probs(self, question: str, passages: Sequence[str]) -> list[dict[int, float]]:
        return self.reader_of(question).char_log_probs(question, passages)

    def no_answer_log_prob(self, question: str, passages: Sequence[str], nulls: str = "max") -> float:
        return self.reader_of(question).no_answer_log_prob(question, passages, nulls)


class GivenAnswersSkipped:
    """An answer-start reader that reads a conversation as one question but does not start where an
    answer an earlier turn gave starts: those starts' probability is taken out and the rest, "no
    answer" included, renormalised, so a follow-up is neither answered with what was already said
    nor let through the gate for it. ``given``: question text -> the answers given in its turns."""

    def __init__(self, reader, given: Mapping[str, Sequence[str]]) -> None:
        self.reader, self.given = reader, given

    def char_log_probs(self, question: str, passages: Sequence[str]) -> list[dict[int, float]]:
        return self._read(question, passages)[0]

    def no_answer_log_prob(self, question: str, passages: Sequence[str], nulls: str = "max") -> float:
        if nulls == "max":
            return self._read(question, passages)[1]
        # Every window's "no answer" P (:func:`~diekae_rag.answer_reader.every_window_no_answer`) beside
        # the starts, of which the share f on the given answers is taken out: P / (P + (1 - P)(1 - f)).
        every, share = self._given_share(question, passages, nulls)
        p = math.exp(every)
        if not share or p <= 0:
            return every
        return every - math.log(p + (1.0 - p) * (1.0 - share))

    def given_or_no_answer_log_prob(self, question: str, passages: Sequence[str], nulls: str = "max") -> float:
        """log P(no answer, or an answer an earlier turn gave): the reader's "no answer" (read as ``nulls``
        says) plus, of the rest, the share its starts put on the given answers before they are taken out.
        A question with no earlier answers gets its plain log P(no answer)."""
        every, share = self._given_share(question, passages, nulls)
        if not share:
            return every
        p = math.exp(every)
        return math.log(min(1.0, p + (1.0 - p) * share))

    def _given_share(self, question: str, passages: Sequence[str], nulls: str) -> tuple[float, float]:
        """log P(no answer) as ``nulls`` reads it, and the share of the reader's starts that lie on the
        answers earlier turns gave (0 when there are none)."""
        every = self.reader.no_answer_log_prob(question, passages, nulls)
        removed = self._read(question, passages)[2]
        starts = -math.expm1(self.reader.no_answer_log_prob(question, passages))  # beside the best window's slot
        return every, (min(1.0, removed / starts) if removed and starts > 0 else 0.0)

    def _read(self, question: str, passages: Sequence[str]) -> tuple[list[dict[int, float]], float, float]:
        lps, null = self.reader.char_log_probs(question, passages), self.reader.no_answer_log_prob(question, passages)
        said = [a for a in (x.strip().rstrip(".!?,;:").strip().lower() for x in self.given.get(question, ())) if a]
        if not said:
            return lps, null, 0.0
        kept, removed = [], 0.0
        for lp, passage in zip(lps, passages):
            spans = [(m.start(), m.end()) for a in said
                     for m in re.finditer(r"(?<!\w)" + re.escape(a) + r"(?!\w)", passage.lower())]
            keep = {c: v for c, v in lp.items() if not any(a <= c < b for a, b in spans)}
            removed += sum(math.exp(v) for c, v in lp.items() if c not in keep)
            kept.append(keep)
        shift = math.log(max(1.0 - removed, 1e-9))
        return [{c: v - shift for c, v in k.items()} for k in kept], null - shift, removed
