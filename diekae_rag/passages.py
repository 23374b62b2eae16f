"""Passages in the forms users hold, as the texts the encoders read.

One converter for every call that takes passages: a ``str``, the store's
:class:`~diekae_rag.retrievers.Passage`, LlamaIndex ``NodeWithScore`` / ``TextNode`` and LangChain
``Document``. The frameworks are not imported: each form is known by the attribute that holds its text.
"""

from __future__ import annotations

import re
from typing import Any

FORMS = "str, diekae_rag.retrievers.Passage, a LlamaIndex NodeWithScore/TextNode or a LangChain Document"


def passage_text(passage: Any) -> str:
    """The text of one passage in any of :data:`FORMS`; anything else raises ``TypeError``."""
    if isinstance(passage, str):
        return passage
    for attr in ("page_content", "text"):  # LangChain Document; the store's Passage and LlamaIndex TextNode
        value = getattr(passage, attr, None)
        if isinstance(value, str):
            return value
    get_content = getattr(passage, "get_content", None)  # LlamaIndex NodeWithScore and any BaseNode
    if callable(get_content):
        value = get_content()
        if isinstance(value, str):
            return value
    raise TypeError(f"Cannot use a {type(passage).__name__} as a passage: pass {FORMS}.")


def passage_texts(knowledge: Any) -> list[str]:
    """``knowledge`` as a list of passage texts: ``None`` is none, one passage is a list of one, and a
    list or tuple holds passages in any of :data:`FORMS` (they may be mixed)."""
    if knowledge is None:
        return []
    if isinstance(knowledge, (list, tuple)):
        return [passage_text(p) for p in knowledge]
    try:
        return [passage_text(knowledge)]
    except TypeError:
        raise TypeError(f"knowledge must be a list of passages ({FORMS}), got {type(knowledge).__name__}.") from None


_BLANK_LINES = re.compile(r"\n\s*\n")


def text_blocks(text: str) -> list[str]:
    """A text's blank-line-separated blocks, stripped: how frameworks join retrieved chunks into one
    context string (LlamaIndex's ``context_str``, LangChain's ``format_docs``), so each chunk is one
    passage again."""
    return [b.strip() for b in _BLANK_LINES.split(text) if b.strip()]
