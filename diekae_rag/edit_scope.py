"""Which prompts an edit encoder acts on (its scope), decided from the prompt's text.

* subject scope: the prompt names an edited subject (whole word, any case);
* fact scope: it names an edited subject *and*, with that subject masked, its wording is nearer
  (MiniLM cosine) to one of that subject's edit prompts than to any other edit prompt of the set:
  a nearest-neighbour scope classifier in the spirit of SERAC, keyed on the edit prompts only.

Prompts out of scope get no rows, so the decoder answers them exactly as it would unedited.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np

MASK = "X"  # what stands in for the subject when wordings are compared
SLOT = "{s}"  # the subject's place in a stored template


def subject_pattern(subjects: Sequence[str]) -> re.Pattern:
    """Whole-word, any-case match of any subject (longest first, so "South Korea" beats "Korea")."""
    alternatives = "|".join(re.escape(s) for s in sorted(subjects, key=len, reverse=True))
    return re.compile(r"\b(?:" + alternatives + r")\b", re.IGNORECASE)


def to_template(prompt: str, subject: str) -> Optional[str]:
    """``prompt`` with its subject replaced by ``{s}``; None when the prompt does not name it."""
    pattern = subject_pattern([subject])
    return pattern.sub(SLOT, prompt) if pattern.search(prompt) else None


@lru_cache(maxsize=1)
def _minilm_encode() -> Callable[[list[str]], np.ndarray]:
    from .retrievers.embeddings import Embedder  # the product's own embedder, loaded once
    return Embedder().encode


class EditScope:
    """Decides, per prompt text, whether one edit encoder applies.

    ``templates`` maps each subject to the wordings of its edit prompts (``{s}`` for the
    subject); empty means subject scope. ``active`` takes the user's text (the question, without
    the chat template). ``embed`` returns unit-norm vectors (default: MiniLM).
    """

    def __init__(self, subjects: Sequence[str], templates: Optional[dict[str, list[str]]] = None,
                 embed: Optional[Callable[[list[str]], np.ndarray]] = None) -> None:
        self.pattern = subject_pattern(subjects) if subjects else None
        self.own = {s.lower(): set(ts) for s, ts in (templates or {}).items()}
        self.keys = sorted({t for ts in self.own.values() for t in ts})
        self._embed = embed
        self._key_vectors: Optional[np.ndarray] = None
        self._lock = threading.Lock()

    def _vectors(self, texts: list[str]) -> np.ndarray:
        return np.asarray((self._embed or _minilm_encode())(texts), dtype=np.float32)

    def _keys(self) -> np.ndarray:
        with self._lock:
            if self._key_vectors is None:
                self._key_vectors = self._vectors([k.replace(SLOT, MASK) for k in self.keys])
            return self._key_vectors

    def active(self, texts: Sequence[str]) -> list[bool]:
        """For each prompt text: does the edit encoder act on it?"""
        if self.pattern is None:
            return [True] * len(texts)
        named = [{m.group(0).lower() for m in self.pattern.finditer(t)} for t in texts]
        out = [bool(n) for n in named]
        # Fact scope: a subject counts only if the prompt's wording is nearest to one of its edits.
        checks = [(i, s) for i, n in enumerate(named) for s in sorted(n)
                  if self.own.get(s) and len(self.own[s]) < len(self.keys)]
        if not self.own or not checks:
            return out
        masked = [subject_pattern([s]).sub(MASK, texts[i]) for i, s in checks]
        nearest = (self._vectors(masked) @ self._keys().T).argmax(axis=1)
        verdict: dict[int, bool] = {}
        for (i, s), j in zip(checks, nearest):
            verdict[i] = verdict.get(i, False) or self.keys[j] in self.own[s]
        return [ok and verdict.get(i, True) for i, ok in enumerate(out)]


class EditScopes:
    """Each edit encoder's scope, made once per encoder config (its MiniLM key vectors are kept)."""

    def __init__(self) -> None:
        self._scopes: dict[int, tuple[object, EditScope]] = {}

    def active(self, config, texts: Sequence[str]) -> list[bool]:
        """Which ``texts`` (the user's part of each prompt) an encoder with ``config`` applies to: they
        must name an edited subject, and in fact scope also be worded like one of that subject's edits."""
        if not config.edit_scope:
            return [True] * len(texts)
        scope = self._scopes.get(id(config))
        if scope is None or scope[0] is not config:
            scope = self._scopes[id(config)] = (config, EditScope(config.edit_scope, config.edit_templates))
        return scope[1].active(texts)

    def clear(self) -> None:
        self._scopes.clear()
