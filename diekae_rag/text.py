"""Answer text normalisation, shared by evaluation and the data builders."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: how answers are compared."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()
