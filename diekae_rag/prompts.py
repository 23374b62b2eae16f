"""Token layout of the decoder's prompt and of the encoders' input.

decoder (none / diekae):  chat(question)
decoder (in_context):     chat(passages + question)
encoder:                  "Imagine that {" K "} " [eos] chat(question) [answer so far]
encoder (isolated):       segments "Imagine that {", "\n" K_1, "\n" K_2, ... then "} " [eos] chat(question) [...]
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
from transformers import PreTrainedTokenizerBase

from .config import EncoderConfig
from .passages import passage_texts

MODES = ("diekae", "in_context", "none")


class KnowledgeTruncatedWarning(UserWarning):
    """Knowledge was longer than the encoders read; the warning says what was cut."""


def match_classes(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token id -> match class for the pointer's token-match prior: a word-start token (BPE "Ġ",
    SentencePiece "▁") shares its class with the same piece without the space, so an answer that
    starts a name without a space still continues it as the passage does."""
    vocab = tokenizer.get_vocab()
    classes = torch.arange(max(len(tokenizer), max(vocab.values()) + 1))
    for piece, i in vocab.items():
        if piece[:1] in ("Ġ", "▁") and piece[1:] in vocab:
            classes[i] = vocab[piece[1:]]
    return classes


Question = Union[str, Sequence[Mapping[str, str]]]
"""A question string, or a conversation: ``{"role": "user" | "assistant", "content": str}`` turns
that end with the user's question. Earlier turns reach the decoder as chat turns."""

_ROLES = ("user", "assistant")


def check_question(question: object) -> Question:
    """``question`` checked: a non-empty string, or a conversation of user/assistant turns that ends
    with a user turn (returned as a list of plain dicts)."""
    if isinstance(question, str):
        if not question.strip():
            raise ValueError("The question is empty; pass the text you want answered.")
        return question
    if not isinstance(question, (list, tuple)):
        raise TypeError(f"question must be a str or a list of chat turns, got {type(question).__name__}.")
    turns = []
    for t in question:
        role, content = (t.get("role"), t.get("content")) if isinstance(t, Mapping) else (None, None)
        if role not in _ROLES or not isinstance(content, str):
            raise TypeError('Each chat turn must be {"role": "user" or "assistant", "content": str}; '
                            f"got {t!r}. Give system instructions through the model's config, not as a turn.")
        turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ValueError("A conversation must end with a non-empty user turn: the question to answer.")
    return turns


def clean_passages(knowledge: object) -> list[str]:
    """Normalise ``knowledge`` to a list of non-blank passage texts.

    ``None`` and ``[]`` mean no knowledge; passages may come in any form that
    :func:`diekae_rag.passages.passage_texts` reads. Blank passages are dropped with a warning;
    anything that is not a passage raises ``TypeError``.
    """
    texts = passage_texts(knowledge)
    kept = [p for p in texts if p.strip()]
    if len(kept) < len(texts):
        warnings.warn(f"Dropped {len(texts) - len(kept)} empty or whitespace-only passage(s).", stacklevel=3)
    return kept


def check_batch(questions: Sequence, knowledges: Optional[Sequence]) -> list:
    """Each question's knowledge (None for all when not given); a bare string or an empty or
    mismatched batch raises."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings; use generate() for one question.")
    if len(questions) == 0:
        raise ValueError("No questions given.")
    knowledges = [None] * len(questions) if knowledges is None else list(knowledges)
    if len(knowledges) != len(questions):
        raise ValueError(f"Got {len(questions)} questions but {len(knowledges)} knowledge lists.")
    return knowledges


def check_answers(questions: Sequence, answers: Sequence) -> None:
    """Answers to score: one non-empty string per question."""
    if len(answers) != len(questions):
        raise ValueError(f"Got {len(questions)} questions but {len(answers)} answers.")
    for a in answers:
        if not isinstance(a, str) or not a.strip():
            raise ValueError("Every answer to score must be a non-empty string.")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    return mode


class Usage(NamedTuple):
    """Token counts of one call (see :meth:`DiekaeModel.usage <diekae_rag.model.DiekaeModel.usage>`)."""

    input_tokens: int      # the decoder's prompt
    output_tokens: int     # the answer
    knowledge_tokens: int  # passage tokens the encoders read


class IsolatedItem(NamedTuple):
    """What the encoders read for one item with passages isolated."""

    segments: list[list[int]]          # token ids: the prefix, then separator + passage each
    knowledge_masks: list[list[bool]]  # per segment, which tokens the copy readout may copy
    tail: list[int]                    # suffix, eos, the prompt and the answer so far
    x_offset: int                      # where the prompt starts in the tail
    rows: int                          # the rows the encoders write (the tail's prompt and answer)


@dataclass
class EncoderBatch:
    """Left-padded encoder input for a batch, and where each item's decoder tokens start."""

    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T) bool
    knowledge_mask: torch.Tensor  # (B, T) bool: the passage tokens the pointer may copy
    x_offset: torch.Tensor        # (B,) encoder position of the first decoder token
    n_rows: torch.Tensor          # (B,) how many decoder tokens get a row (prefill)


class Prompter:
    """Builds token ids for the decoder and the encoders from one tokenizer and one config."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: EncoderConfig,
                 max_prompt_tokens: Optional[int] = None) -> None:
        self.tok = tokenizer
        self.config = config
        self.max_prompt_tokens = max_prompt_tokens  # the decoder's positions (None: unchecked)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._encode = functools.lru_cache(maxsize=4096)(self._encode_uncached)
        self._chat_frame: Optional[tuple[str, str, str, str]] = None
        self.stop_ids = [self.eos_id] + [t for t in [self._turn_start_id()] if t is not None and t != self.eos_id]

    def _turn_start_id(self) -> Optional[int]:
        """The special token a chat turn opens with (``<|im_start|>`` in ChatML), if any.

        Generation stops there too: a model that opens a new turn has ended its answer, even
        when it skipped the end-of-turn token.
        """
        if not getattr(self.tok, "chat_template", None):
            return None
        try:
            text = self.tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        except Exception:  # a template that insists on other roles: no extra stop token
            return None
        first = self.ids(text)[:1]
        return first[0] if first and first[0] in set(self.tok.all_special_ids) else None

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def ids(self, text: str) -> list[int]:
        return list(self._encode(text))

    def prompt_text(self, question: Question, passages: Sequence[str] = ()) -> str:
        """The decoder's prompt: chat template, passages in the (last) user turn only when given.
        A conversation's earlier turns come before it as turns of their own."""
        turns = [{"role": "user", "content": question}] if isinstance(question, str) else [dict(t) for t in question]
        if passages:
            turns[-1]["content"] = "Passages:\n" + "\n\n".join(passages) + "\n\nQuestion: " + turns[-1]["content"]
        if getattr(self.tok, "chat_template", None):
            if self.config.system_prompt:
                turns.insert(0, {"role": "system", "content": self.config.system_prompt})
            return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        prefix = f"{self.config.system_prompt}\n" if self.config.system_prompt else ""
        history = "".join(f"{t['role'].capitalize()}: {t['content']}\n" for t in turns[:-1])
        last = ("User: " if history else "") + turns[-1]["content"]
        return f"{prefix}{history}{last}\nAnswer:"

    def prompt_ids(self, question: Question, passages: Sequence[str] = ()) -> list[int]:
        """The decoder's prompt; one longer than the decoder's positions raises ``ValueError``."""
        ids = self.ids(self.prompt_text(question, passages))
        if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
            raise ValueError(f"The prompt is {len(ids)} tokens long; the decoder reads at most "
                             f"{self.max_prompt_tokens}. Shorten the question" +
                             (", or pass the passages with mode='diekae' (they then stay out of the prompt)."
                              if passages else "."))
        return ids

    def _frames(self) -> tuple[str, str, str, str]:
        """The chat template's text before the first question (``head``), after the last (``tail``),
        from an answer's end to the next question (``turn``) and from a question's end to its answer
        (``reply``): found once by rendering marker conversations."""
        if self._chat_frame is None:
            a, b, c = "QQONEQQ", "QQTWOQQ", "QQTHREEQQ"
            one = self.tok.decode(self.prompt_ids(a))
            head, _, tail = one.partition(a)
            three = self.tok.decode(self.prompt_ids([{"role": "user", "content": a},
                                                     {"role": "assistant", "content": b},
                                                     {"role": "user", "content": c}]))
            self._chat_frame = (head, tail, three[three.index(b) + len(b): three.index(c)],
                                three[three.index(a) + len(a): three.index(b)])
        return self._chat_frame

    def _conversation(self, prompt: list[int]) -> str:
        head, tail, _, _ = self._frames()
        text = self.tok.decode(prompt)
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
            text = text[len(head): len(text) - len(tail)]
        return text

    def user_text(self, prompt: list[int]) -> str:
        """The last user turn of a prompt (the question, and in-context passages), without the chat
        template's frame."""
        text, turn = self._conversation(prompt), self._frames()[2]
        if turn and turn in text:
            text = text[text.rindex(turn) + len(turn):]
        return text.strip()

    def question_text(self, prompt: list[int], turns: int = 1) -> str:
        """The question as the copy's question-aware parts (passage prior, answer-start reader, gate)
        read it: the last user turn, after up to ``turns - 1`` turns before it (the earlier questions
        and answers, in order, joined by spaces), so a follow-up such as "Where was she born?" keeps
        the name an earlier turn gave. ``turns=1``: the last user turn alone (:meth:`user_text`)."""
        return " ".join(self.question_turns(prompt, turns))

    def question_turns(self, prompt: list[int], turns: int = 1) -> list[str]:
        """The texts of the last ``turns`` turns, the last user turn last (so answers, where there are
        any, are at positions -2, -4, ...)."""
        if turns <= 1:
            return [self.user_text(prompt)]
        _, _, turn, reply = self._frames()
        parts: list[str] = []
        for exchange in (self._conversation(prompt).split(turn) if turn else [self._conversation(prompt)]):
            parts.extend(exchange.split(reply) if reply else [exchange])
        return [p.strip() for p in parts[-turns:] if p.strip()]

    def answer_ids(self, answer: str, with_eos: bool = False) -> list[int]:
        return self.ids(answer) + ([self.eos_id] if with_eos else [])

    def held(self, passages: Sequence[str]) -> list[str]:
        """The passages the encoders read at least one token of within ``max_knowledge_tokens`` (the
        first ones, as :meth:`passage_ids` cuts): what the reader, the passage prior and the gate read,
        since the copy can start nowhere else."""
        return list(passages[:sum(1 for ids in self._within_budget(passages) if ids)])

    def usage(self, prompt: list[int], passages: Sequence[str], answer: str) -> Usage:
        """Token counts of one call: the decoder's prompt, the answer, and the passage tokens the
        encoders read (``passages``: those of a diekae call; in-context passages are in the prompt)."""
        with warnings.catch_warnings():  # the call itself has warned about any cut
            warnings.simplefilter("ignore", KnowledgeTruncatedWarning)
            read = sum(map(len, self.passage_ids(passages))) if passages else 0
        return Usage(len(prompt), len(self.ids(answer)) if answer else 0, read)

    def passage_ids(self, passages: Sequence[str]) -> list[list[int]]:
        """Token ids of each passage, cut to ``max_knowledge_tokens`` in all with a warning that says how much."""
        out = self._within_budget(passages)
        full = [len(self.ids(p)) for p in passages]
        cut_tokens = sum(f - len(ids) for f, ids in zip(full, out))
        if cut_tokens:
            cut_passages = sum(f > len(ids) for f, ids in zip(full, out))
            warnings.warn(
                f"Knowledge has {sum(full)} tokens but the encoders read at most {self.config.max_knowledge_tokens} "
                f"(max_knowledge_tokens): cut {cut_tokens} tokens from {cut_passages} of {len(passages)} "
                "passage(s), keeping the first ones. Pass fewer or shorter passages, or raise "
                "max_knowledge_tokens.", KnowledgeTruncatedWarning, stacklevel=5)
        return out

    def _within_budget(self, passages: Sequence[str]) -> list[list[int]]:
        """Each passage's token ids, the first ones kept whole and the rest cut once
        ``max_knowledge_tokens`` is used up (empty for passages past it)."""
        budget, used, out = self.config.max_knowledge_tokens, 0, []
        for p in passages:
            p_ids = self.ids(p)[:max(budget - used, 0)]
            out.append(p_ids)
            used += len(p_ids)
        return out

    def knowledge_ids(self, passages: Sequence[str]) -> tuple[list[int], list[bool]]:
        """``prefix + passages + suffix + [eos]``, and which tokens are passage text."""
        cfg = self.config
        sep = self._separator()
        ids = self.ids(cfg.knowledge_prefix)
        mask = [False] * len(ids)
        for i, p_ids in enumerate(self.passage_ids(passages)):
            if i:
                ids += sep
                mask += [False] * len(sep)
            ids += p_ids
            mask += [True] * len(p_ids)
        suffix = self.ids(cfg.knowledge_suffix) + [self.eos_id]
        return ids + suffix, mask + [False] * len(suffix)

    def isolated_item(self, passages: Sequence[str], x_ids: list[int], answer_ids: Optional[list[int]] = None
                      ) -> "IsolatedItem":
        """One item's passage isolation layout (see :class:`IsolatedItem`)."""
        cfg = self.config
        prefix = self.ids(cfg.knowledge_prefix)
        segments, kmasks = [prefix], [[False] * len(prefix)]
        for p_ids in self.passage_ids(passages):
            segment, kmask = self._passage_segment(p_ids)
            segments.append(segment)
            kmasks.append(kmask)
        head = self.ids(cfg.knowledge_suffix) + [self.eos_id]
        tail = x_ids + (list(answer_ids) if (answer_ids and cfg.per_step) else [])
        return IsolatedItem(segments, kmasks, head + tail, len(head), len(tail))

    def whole_segments(self, passages: Sequence[str]) -> list[Optional[tuple[list[int], list[bool]]]]:
        """For each segment of :meth:`isolated_item`, the whole segment (ids, knowledge mask) of a
        passage the knowledge budget cuts, whose head that segment is; None for the others."""
        out: list[Optional[tuple[list[int], list[bool]]]] = [None]  # the knowledge prefix
        for p, kept in zip(passages, self._within_budget(passages)):
            full = self.ids(p)
            out.append(self._passage_segment(full) if len(kept) < len(full) else None)
        return out

    def _separator(self) -> list[int]:
        return self.ids(self.config.passage_separator) if self.config.passage_separator else []

    def _passage_segment(self, p_ids: list[int]) -> tuple[list[int], list[bool]]:
        """A passage's isolated segment: the separator, then its tokens, and which of them it may copy."""
        sep = self._separator()
        return sep + p_ids, [False] * len(sep) + [True] * len(p_ids)

    def encoder_item(self, passages: Sequence[str], x_ids: list[int], answer_ids: Optional[list[int]] = None
                     ) -> tuple[list[int], list[bool], int, int]:
        """One item's encoder ids, knowledge mask, offset of x and number of rows."""
        head, head_mask = self.knowledge_ids(passages)
        tail = x_ids + (list(answer_ids) if (answer_ids and self.config.per_step) else [])
        return head + tail, head_mask + [False] * len(tail), len(head), len(tail)

    def encoder_batch(self, items: Sequence[tuple[list[int], list[bool], int, int]],
                      device: torch.device) -> EncoderBatch:
        T = max(len(ids) for ids, *_ in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.bool)
        kmask = torch.zeros((B, T), dtype=torch.bool)
        offs, rows = [], []
        for b, (ids, km, off, n) in enumerate(items):
            pad = T - len(ids)
            input_ids[b, pad:] = torch.tensor(ids)
            attn[b, pad:] = True
            kmask[b, pad:] = torch.tensor(km)
            offs.append(pad + off)
            rows.append(n)
        return EncoderBatch(input_ids.to(device), attn.to(device), kmask.to(device),
                            torch.tensor(offs, device=device), torch.tensor(rows, device=device))

    def pad(self, seqs: Sequence[list[int]], device: torch.device, side: str = "left"
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad decoder token lists to (ids, attention_mask)."""
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            if side == "left":
                ids[b, T - len(s):], mask[b, T - len(s):] = torch.tensor(s), 1
            else:
                ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        return ids.to(device), mask.to(device)
