"""The names that stored passage states go by: one module that both caches use."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence


def segment_key(ids: Sequence[int], knowledge: Sequence[bool]) -> str:
    """The stored name of a segment: a hash of its token ids and copyable mask."""
    h = hashlib.sha256(json.dumps([list(map(int, ids)), [bool(k) for k in knowledge]]).encode())
    return h.hexdigest()[:32]


def text_key(text: str) -> str:
    """The stored name of a passage text's sentence vector."""
    return "text-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def reader_key(text: str, fingerprint: str) -> str:
    """The stored name of a passage text's answer-reader side, for one reader's weights."""
    return "read-" + hashlib.sha256(f"{fingerprint}\0{text}".encode("utf-8")).hexdigest()[:32]


def tokens_key(text: str) -> str:
    """The stored name of what the copy needs of a passage text's tokens (:class:`~diekae_rag.copy.pieces.PassageTokens`)."""
    return "tok-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
