"""Chunks: token windows with overlap, cut on the original text (no detokenisation artefacts)."""

from __future__ import annotations

from dataclasses import dataclass

from .documents import Document


@dataclass
class Chunk:
    doc_id: str
    index: int
    text: str
    start: int  # character offsets into the document
    end: int


def chunk_document(doc: Document, tokenizer, chunk_tokens: int = 120, overlap: int = 20) -> list[Chunk]:
    """Split ``doc`` into windows of ``chunk_tokens`` tokens that overlap by ``overlap`` tokens."""
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens={chunk_tokens} is too small; use at least 8.")
    if not 0 <= overlap < chunk_tokens:
        raise ValueError(f"overlap={overlap} must be >= 0 and smaller than chunk_tokens={chunk_tokens}.")
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if not offsets:
        return []
    text = doc.text

    def inside_word(tok: int) -> bool:  # the token continues the previous token's word
        s = offsets[tok][0]
        return 0 < s < len(text) and text[s - 1].isalnum() and text[s].isalnum()

    chunks, start_tok, step = [], 0, chunk_tokens - overlap
    while True:
        while 0 < start_tok < len(offsets) - 1 and inside_word(start_tok):
            start_tok += 1  # start on a word boundary
        end_tok = min(start_tok + chunk_tokens, len(offsets))
        while end_tok < len(offsets) and inside_word(end_tok):
            end_tok += 1  # finish the last word (a window may run a few tokens long)
        s, e = offsets[start_tok][0], offsets[end_tok - 1][1]
        piece = text[s:e].strip()
        if piece:
            chunks.append(Chunk(doc.doc_id, len(chunks), piece, s, e))
        if end_tok >= len(offsets):
            break
        start_tok += step
    return chunks
