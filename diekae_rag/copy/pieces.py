"""Answer pieces: extra copy slots so that a name can be copied as an answer writes it.

A passage holds " Ithpelith" as ` Ith|pel|ith`, but an answer starts it as `I|th|pel|ith`: the
first piece differs, and "th" is no passage token, so after writing "I" the copy has nowhere to
continue. For every word whose answer-start tokenisation differs from the passage's, this adds
slots for its later pieces ("th", "pel"; "ith" after "pel" is already a passage slot) until the
pieces meet the passage's own tokens again, or, where they never do, one more slot for the passage
token after the word (:func:`bridge`), so the copy goes on to the next word. Each piece has two
slots, one with the key of the passage token covering its first character and one with the key
made where the copy has reached (the slot after the token holding the previous piece's last
character); it carries the match class of the piece before it, so the token match continues the
copy along them, and continues the first copy or the piece before it. They are never chosen for
the first copy.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ..lru import LRU
from .memory import CopyMemory, KnowledgeLayout, append_slots

MAX_PIECES = 8  # pieces kept per word (a longer word's tail continues on the passage tokens)
WORD = re.compile(r"\S+")


class Piece(NamedTuple):
    """One later piece of a word as an answer writes it; indices are passage token positions."""
    id: int        # the piece's token id
    prev: int      # the id of the piece before it
    cover: int     # the passage token covering the piece's first character
    after: int     # the token after the one covering the previous piece's last character
    word: int      # the passage token the word starts at (where the first copy is)
    j: int         # the piece's place in the word's answer tokenisation (1 = right after the first)


def encode_many(tokenizer, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, no special tokens. A fast tokenizer's Rust backend is
    called directly: the same encodings, without the per-text conversion that costs about 0.3 ms."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, [tuple(o) for o in e.offsets]) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, [tuple(o) for o in offs]) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def word_pieces(tokenizer, text: str, spans: Sequence[tuple[int, int]], ids: Sequence[int], classes: torch.Tensor
                ) -> list[Piece]:
    """For each word whose answer-start tokenisation differs from the passage's: its later pieces."""
    starts = []  # (passage token index, word start char, word end char)
    for s, (a, b) in enumerate(spans):
        if a < b and (a == 0 or text[a].isspace() or text[a - 1].isspace()):
            m = WORD.search(text, a)
            if m and m.start() < b:
                starts.append((s, m.start(), m.end()))
    if not starts:
        return []
    enc = encode_many(tokenizer, [text[w0:w1] for _, w0, w1 in starts])
    ends = {b: t for t, (_, b) in enumerate(spans)}  # passage token by the character it ends at
    out = []
    for (s, w0, w1), (alt, offs) in zip(starts, enc):
        if len(alt) < 2 or alt[0] == int(classes[ids[s]]):
            continue

        def met(j: int) -> bool:  # piece j-1 ends where a passage token of its class ends, and piece j is the next one
            t = ends.get(w0 + offs[j - 1][1])
            return (t is not None and t + 1 < len(ids) and int(classes[ids[t]]) == int(classes[alt[j - 1]])
                    and ids[t + 1] == alt[j] and spans[t + 1][1] == w0 + offs[j][1])
        t = s
        for j in range(1, min(len(alt), MAX_PIECES)):
            if met(j):
                break  # the pieces have met the passage's tokens again: its own slots continue the copy
            c = w0 + offs[j][0]
            while t + 1 < len(spans) and spans[t + 1][0] <= c - 1:
                t += 1
            after = t + 1  # the slot after the token holding the previous piece's last character
            while t + 1 < len(spans) and spans[t + 1][0] <= c:
                t += 1
            out.append(Piece(alt[j], alt[j - 1], t, after, s, j))
        else:  # the pieces never met the passage's tokens (a word past MAX_PIECES is left to them)
            if len(alt) <= MAX_PIECES:
                out += bridge(alt, ends.get(w1), ids, classes, s)
    return out


def bridge(alt: Sequence[int], last: Optional[int], ids: Sequence[int], classes: torch.Tensor, word: int) -> list[Piece]:
    """The passage's token after a word, as a piece after the word's last answer piece, where that piece
    is not the passage's own last piece of the word (" Or|sen Th|arv|ik" written as "O|rs|en": the
    passage's " Th" follows "sen", not "en", so without it the copy would stop at "Orsen"). ``last``: the
    passage token where the word ends (None where none ends there)."""
    if last is None or last + 1 >= len(ids) or int(classes[ids[last]]) == int(classes[alt[-1]]):
        return []
    return [Piece(ids[last + 1], alt[-1], last + 1, last + 1, word, len(alt))]


class TokenRecord(NamedTuple):
    """What :class:`PassageTokens` computes for one passage text, as stored with its states."""
    ids: list[int]
    spans: list[tuple[int, int]]
    first: list[int]
    pieces: list[Piece]

    FIELDS = ("ids", "spans", "first", "pieces")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor(self.ids, dtype=torch.int32),
                "spans": torch.tensor(self.spans, dtype=torch.int32).reshape(-1, 2),
                "first": torch.tensor(self.first, dtype=torch.int32),
                "pieces": torch.tensor(self.pieces, dtype=torch.int32).reshape(-1, len(Piece._fields))}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "TokenRecord":
        return cls(t["ids"].tolist(), [tuple(x) for x in t["spans"].tolist()], t["first"].tolist(),
                   [Piece(*x) for x in t["pieces"].tolist()])


class PassageTokens:
    """What the copy needs of each passage text, computed once per text (a thread-safe LRU): its
    tokens' character spans, each token's first piece (the first token of the text from there on,
    without the leading space: " Ithpelith" -> "I"), and its answer pieces (:func:`word_pieces`).
    With ``stored`` (a state store's ``passage_tokens``), a text indexed with its states is read
    back (:meth:`fetch`) instead of tokenised again."""

    def __init__(self, tokenizer, max_passages: int = 4096) -> None:
        self.tokenizer = tokenizer
        self._kept = LRU(max_passages)
        self._classes = None
        self.stored: Optional[Callable[[Sequence[str]], dict]] = None

    def spans(self, text: str) -> list[tuple[int, int]]:
        return self._encoded(text)[1]

    def _encoded(self, text: str):
        def make():
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], [tuple(x) for x in enc["offset_mapping"]]
        return self._kept.get_or_make(("enc", text), make)

    def first_pieces(self, text: str) -> list[int]:
        def make():
            texts = [text[a: a + 32].lstrip() or text[a: a + 32] for a, _ in self.spans(text)]
            ids = [x for x, _ in encode_many(self.tokenizer, texts)] if texts else []
            return [x[0] if x else -1 for x in ids]
        return self._kept.get_or_make(("first", text), make)

    def word_pieces(self, text: str, classes: torch.Tensor) -> list[Piece]:
        self._use_classes(classes)
        ids, spans = self._encoded(text)
        return self._kept.get_or_make(("pieces", text), lambda: word_pieces(self.tokenizer, text, spans, ids, classes))

    def _use_classes(self, classes: torch.Tensor) -> None:
        if classes is not self._classes:  # another tokenizer-to-class map: forget the old pieces
            self._kept.drop(lambda key: key[0] == "pieces")
            self._classes = classes

    def record(self, text: str, classes: torch.Tensor) -> TokenRecord:
        """Everything kept for ``text``, made where missing (what a state store keeps)."""
        ids, spans = self._encoded(text)
        return TokenRecord(list(ids), list(spans), self.first_pieces(text), self.word_pieces(text, classes))

    def fetch(self, texts: Sequence[str], classes: torch.Tensor) -> None:
        """Read the records of those ``texts`` not kept here from ``stored``, and keep them."""
        if self.stored is None:
            return
        self._use_classes(classes)
        texts = list(dict.fromkeys(texts))
        kept = self._kept.get_many([("pieces", t) for t in texts])
        todo = [t for t in texts if ("pieces", t) not in kept]
        if todo:
            found = self.stored(todo)
            self._kept.put_many([item for t, r in found.items() for item in
                                 ((("enc", t), (r.ids, r.spans)), (("first", t), r.first), (("pieces", t), r.pieces))])


def first_piece_ids(tokens: PassageTokens, passages: Sequence[Sequence[str]], layout: KnowledgeLayout,
                    device: torch.device) -> torch.Tensor:
    """(B, width) token ids: each passage token's first piece (see :class:`PassageTokens`); -1 elsewhere."""
    values = [[tokens.first_pieces(p)[: len(spans)] for p, (_, spans) in zip(ps, per)]
              for ps, per in zip(passages, layout.items)]
    return layout.rows(values, -1, torch.long, device)


def add_answer_pieces(memory: CopyMemory, tokens: PassageTokens, classes: torch.Tensor,
                      value_rows: Callable[[torch.Tensor], torch.Tensor], passages: Sequence[Sequence[str]],
                      layout: KnowledgeLayout) -> CopyMemory:
    """``memory`` with each item's answer pieces appended (padded with invalid slots to the longest
    item), in two blocks: the pieces with the covering token's key, then with the key of the slot
    after the previous piece's end, where that differs or where the piece before it has a slot in
    this block (so that a copy that went on along this block's keys can go on: continuation follows
    each block's own chain)."""
    dev = memory.keys.device
    per_item = []
    for ps, per in zip(passages, layout.items):
        # (piece id, previous piece id, covering slot, slot after the previous piece's end, first-copy slot or -1,
        #  1 where the piece has its slot in the second block)
        slots: list[tuple[int, ...]] = []
        for p, (start, spans) in zip(ps, per):  # spans: the tokens kept (a cut passage keeps its head)
            for x in tokens.word_pieces(p, classes):
                if x.cover >= len(spans):
                    continue
                after = x.after if x.after < len(spans) else x.cover
                second = after != x.cover or (x.j > 1 and bool(slots) and slots[-1][5] == 1)
                slots.append((x.id, x.prev, start + x.cover, start + after, start + x.word if x.j == 1 else -1,
                              int(second)))
        per_item.append(slots)
    V = max((len(s) for s in per_item), default=0)
    if V == 0:
        return memory
    table = torch.full((len(per_item), V, 6), -1, dtype=torch.long, device=dev)
    for b, slots in enumerate(per_item):
        if slots:
            table[b, :len(slots)] = torch.tensor(slots, device=dev)
    valid = table[..., 0] >= 0
    pid, prev = table[..., 0].clamp(min=0), classes[table[..., 1].clamp(min=0)]
    cover, after, first = table[..., 2].clamp(min=0), table[..., 3].clamp(min=0), table[..., 4]
    values = value_rows(pid)

    def block(memory: CopyMemory, src: torch.Tensor, valid: torch.Tensor) -> CopyMemory:
        # A piece continues the first copy (j = 1) or the piece before it, the slot before it in this block.
        at = memory.width + torch.arange(V, device=dev)[None]
        return append_slots(memory, values, pid, src, valid, prev, torch.where(first >= 0, first, at - 1))
    return block(block(memory, cover, valid), after, valid & (table[..., 5] == 1))
