"""Answer pieces: extra pointer slots so that a name can be copied as an answer writes it.

A passage holds " Ithpelith" as ` Ith|pel|ith`, but an answer starts it as `I|th|pel|ith`: the
first piece differs, and "th" is no passage token, so after writing "I" the copy has nowhere to
continue. For every word whose answer-start tokenisation differs from the passage's, this adds
one pointer slot per later piece ("th", "pel"; "ith" after "pel" is already a passage slot),
each carrying the match class of the piece before it (so the token match continues the copy along them), a
borrowed key, and its own output embedding as value. The key (``DiekaeConfig.pointer_piece_keys``) is
that of the passage token covering the piece's first character ("covering"), that of the slot after
the token covering the previous piece's last character ("after": keys come from the state one
position earlier, so that is the key made where the copy has reached, e.g. at " curved" after "cur"),
or one slot with each ("both"). Each piece continues the first copy or the piece before it (for
``pointer_continue_bonus``). The slots follow the real ones in the pointer memory; they are never
chosen for the first copy.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import NamedTuple, Optional, Sequence

import torch

from .encoder import DiekaeEncoder, EncoderCache, previous_slots, shifted_prev
from .lru import LRU

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
    enc = tokenizer([text[w0:w1] for _, w0, w1 in starts], add_special_tokens=False, return_offsets_mapping=True)
    ends = {b: t for t, (_, b) in enumerate(spans)}  # passage token by the character it ends at
    out = []
    for (s, w0, _), alt, offs in zip(starts, enc["input_ids"], enc["offset_mapping"]):
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
    return out


class PassageTokens:
    """What the first copy and the answer pieces need of each passage, computed once per passage
    text (a thread-safe LRU, like the passage cache): its tokens' character spans, each token's
    first piece (the first token of the text from there on, without the leading space: " Ithpelith"
    -> "I"), and its answer pieces (:func:`word_pieces`)."""

    def __init__(self, tokenizer, max_passages: int = 4096) -> None:
        self.tokenizer = tokenizer
        self._kept = LRU(max_passages)
        self._classes = None

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
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            return [x[0] if x else -1 for x in ids]
        return self._kept.get_or_make(("first", text), make)

    def word_pieces(self, text: str, classes: torch.Tensor) -> list[Piece]:
        if classes is not self._classes:  # another tokenizer-to-class map: forget the old pieces
            self._kept.drop(lambda key: key[0] == "pieces")
            self._classes = classes
        ids, spans = self._encoded(text)
        return self._kept.get_or_make(("pieces", text), lambda: word_pieces(self.tokenizer, text, spans, ids, classes))


def add_answer_pieces(encoder: DiekaeEncoder, tokens: PassageTokens, cache: EncoderCache,
                      passages: Sequence[Sequence[str]], layout) -> tuple[EncoderCache, int]:
    """``cache`` with each item's answer pieces appended to its pointer memory (padded with invalid
    slots to the longest item), and the number of slots added. ``layout`` is the model's
    ``(width, [per item: [(first slot, token spans) per passage]])``. Which key each piece borrows
    is ``DiekaeConfig.pointer_piece_keys``; with "both" every piece has two slots, in two blocks."""
    dev = cache.pointer_keys.device
    classes = encoder.match_classes if encoder.match_classes is not None else torch.arange(
        int(encoder._frozen[1].weight.shape[0]), device=dev)
    per_item = []
    for ps, per in zip(passages, layout[1]):
        slots = []  # (piece id, previous piece id, covering slot, slot after the previous piece's end, first-copy slot or -1)
        for p, (start, spans) in zip(ps, per):  # spans: the tokens kept (a cut passage keeps its head)
            slots += [(x.id, x.prev, start + x.cover, start + (x.after if x.after < len(spans) else x.cover),
                       start + x.word if x.j == 1 else -1)
                      for x in tokens.word_pieces(p, classes) if x.cover < len(spans)]
        per_item.append(slots)
    V = max((len(s) for s in per_item), default=0)
    if V == 0:
        return cache, 0
    B = len(per_item)
    table = torch.full((B, V, 5), -1, dtype=torch.long, device=dev)
    for b, slots in enumerate(per_item):
        if slots:
            table[b, :len(slots)] = torch.tensor(slots, device=dev)
    valid = table[..., 0] >= 0
    pid, prev = table[..., 0].clamp(min=0), classes[table[..., 1].clamp(min=0)]
    cover, after = table[..., 2].clamp(min=0), table[..., 3].clamp(min=0)
    first = table[..., 4]

    def block(cache: EncoderCache, src: torch.Tensor, valid: torch.Tensor) -> EncoderCache:
        # A piece continues the first copy (j = 1) or the piece before it, the slot before it in this block.
        at = cache.pointer_valid.shape[1] + torch.arange(V, device=dev)[None]
        return append_slots(encoder, cache, pid, src, valid, prev=prev, pred=torch.where(first >= 0, first, at - 1))
    mode = encoder.config.pointer_piece_keys
    if mode == "both":  # the second block only where the two keys differ (positions kept for the bigram)
        return block(block(cache, cover, valid), after, valid & (after != cover)), 2 * V
    return block(cache, after if mode == "after" else cover, valid), V


def append_slots(encoder: DiekaeEncoder, cache: EncoderCache, value_ids: torch.Tensor, src: torch.Tensor,
                 valid: torch.Tensor, prev: Optional[torch.Tensor] = None,
                 extra_bias: Optional[torch.Tensor] = None, match_only: bool = False,
                 pred: Optional[torch.Tensor] = None) -> EncoderCache:
    """``cache`` with (B, V) virtual slots appended to its pointer memory: each copies slot ``src``'s
    key, passage prior and first-scorer key, writes token ``value_ids``, and is kept where ``valid``.
    ``prev`` gives their match classes (then the class two back is read positionally, as for the
    pieces of one word); without it they copy ``src``'s match classes too (both). ``extra_bias`` is
    added to their pointer scores at every position; with ``match_only`` they can only be chosen where
    the token match holds (right after their ``prev`` token was written). ``pred`` (B, V) gives the
    slot each continues (for ``pointer_continue_bonus``; default: ``src``'s)."""
    rows = torch.arange(src.shape[0], device=src.device)[:, None]
    keys = cache.pointer_keys[rows, :, src].permute(0, 2, 1, 3)  # (B, heads, V, dk)
    values = encoder.value_rows(value_ids).to(cache.pointer_values.dtype)
    bias = cache.knowledge_bias[rows, src] if cache.knowledge_bias is not None else None
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
        if cache.knowledge_bias is None:
            cache = replace(cache, knowledge_bias=torch.zeros_like(cache.pointer_valid, dtype=extra_bias.dtype))
    prev2 = None
    if cache.pointer_prev is not None:
        old2 = shifted_prev(cache.pointer_prev) if cache.pointer_prev2 is None else cache.pointer_prev2
        if prev is None:
            prev, prev2 = cache.pointer_prev[rows, src], old2[rows, src]
        else:
            prev2 = shifted_prev(torch.cat([cache.pointer_prev, prev], 1))[:, -prev.shape[1]:]
        prev2 = torch.cat([old2, prev2], 1)

    old_pred = cache.pointer_pred if cache.pointer_pred is not None else previous_slots(cache.pointer_valid)
    pred = old_pred[rows, src] if pred is None else pred

    def cat(x, extra):
        return None if x is None or extra is None else torch.cat([x, extra], 1)
    only = cache.match_only
    if match_only or only is not None:
        only = torch.cat([torch.zeros_like(cache.pointer_valid) if only is None else only,
                          torch.full_like(valid, match_only)], 1)
    return replace(
        cache,
        pointer_keys=torch.cat([cache.pointer_keys, keys], 2),
        pointer_values=cat(cache.pointer_values, values),
        pointer_valid=cat(cache.pointer_valid, valid),
        pointer_prev=cat(cache.pointer_prev, prev),
        pointer_prev2=prev2,
        match_only=only,
        knowledge_bias=cat(cache.knowledge_bias, bias),
        knowledge_ids=cat(cache.knowledge_ids, value_ids),
        first_keys=cat(cache.first_keys, cache.first_keys[rows, src] if cache.first_keys is not None else None),
        pointer_pred=torch.cat([old_pred, pred], 1),
    )
