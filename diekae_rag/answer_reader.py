"""Answer-start reader: a small question-aware side encoder that says where an answer starts.

The pointer's keys are computed from each passage alone (so passages can be cached), which
means only the query side can choose *which* span to copy. This reader is the question-aware
half: a MiniLM (the retriever's own embedder, fine-tuned as an extractive reader) reads each
(question, passage) pair and scores every word-piece as the start of the answer. Its
log-probabilities, mapped onto the decoder's passage tokens, are added to the pointer's scores
at the one position that predicts the answer's first token (``CopyConfig.reader_weight``,
through :class:`diekae_rag.copy.ReaderScores`).
The decoder still reads only the question.

With ``ReaderConfig.separate_layers = n``, the first n MiniLM layers read the question and each
passage apart, and only the layers above read them together (as PreTTR does for re-rankers). A
passage's states after those n layers depend on the passage alone, so they are computed when the
passage is indexed and stored with its encoder states (:meth:`AnswerStartReader.passage_sides`);
a question then costs its own n layers plus the joint top layers over k passages.

With ``ReaderConfig.joint = "cross"`` every layer reads the passage alone (its side is stored whole)
and one cross-attention (:class:`CrossReading`) reads each passage word-piece against the question's
word-pieces, in an order whose cost per passage word-piece does not grow with the model's width
squared: a question then costs its own layers and about 2 × heads × its length multiply-adds per
passage word-piece and hidden unit (late interaction, as in ColBERT and DensePhrases).

Markdown markup that never starts an answer (heading, list and quote markers, emphasis asterisks)
is blanked before the reader reads a passage (:func:`without_markup`): its MiniLM was trained on
prose, and put half its mass on the "#" of a heading.

The reader serves in bfloat16 on a CPU with native bfloat16 matrix products
(:func:`serving_dtype`): about 2.5 times faster than float32, with the same dev rows.

Saved like the encoders (PEFT-style): ``reader.json`` + ``reader.safetensors``, holding the head
and every MiniLM weight except the word embeddings, which stay frozen and come from the
installed MiniLM package.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .copy.config import GATE_NULLS
from .lru import LRU

READER_CONFIG = "reader.json"
READER_WEIGHTS = "reader.safetensors"
FROZEN = "embeddings.word_embeddings.weight"

_MARKUP = re.compile(r"(?m)^[ \t]{0,3}(?:#{1,6}|[-*+]|>+)(?=[ \t])|\*{1,3}(?=\w)|(?<=\w)\*{1,3}")
MARKUP_VERSION = "blanked-1"  # part of the fingerprint: stored passage sides read with this markup rule


class QuestionCutWarning(UserWarning):
    """The answer-start reader read only the end of a long question."""


def without_markup(text: str) -> str:
    """``text`` with markdown markup that never starts an answer replaced by spaces of the same
    length: heading, list and quote markers at a line's start and emphasis asterisks. Character
    offsets into the result are offsets into ``text``."""
    return _MARKUP.sub(lambda m: re.sub(r"\S", " ", m.group(0)), text)


@dataclass
class ReaderConfig:
    base: str = ""            # MiniLM folder ("" = the installed all-MiniLM-L6-v2)
    max_length: int = 256     # word-pieces per window (question + passage)
    stride: int = 64          # overlap between windows of a long passage
    separate_layers: int = 0  # the first layers read question and passage apart (0: every layer reads them together)
    passage_position: int = 16  # position id of a passage's first word-piece when it is read alone
    layers: Optional[list[int]] = None  # which of the base's layers the reader keeps, in order (None: all)
    joint: str = "layers"     # "layers": the top layers read both; "cross": one cross-attention does (CrossReading)

    @classmethod
    def from_dict(cls, data: dict) -> "ReaderConfig":
        data = dict(data)
        if data.pop("end_head", False):  # retired (docs/decisions.md): a saved reader may carry it only off
            raise ValueError("This reader has an end head, which was removed (docs/decisions.md); use a reader "
                             "saved without one.")
        return cls(**data)

    def base_path(self) -> str:
        if self.base:
            return self.base
        from .defaults import default_embedder_path
        return str(default_embedder_path())


class AnswerStartReader(nn.Module):
    """MiniLM + a linear start head; position 0 ([CLS]) is the "no answer here" slot."""

    def __init__(self, config: Optional[ReaderConfig] = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        self.config = config or ReaderConfig()
        path = self.config.base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.bert = AutoModel.from_pretrained(path)
        self.bert.get_input_embeddings().weight.requires_grad_(False)
        if self.config.layers is not None:
            self._keep(self.config.layers)
        self.head = nn.Linear(self.bert.config.hidden_size, 1)
        self.cross = CrossReading(self.bert.config) if self.config.joint == "cross" else None
        self.check_config()
        self._lock = threading.Lock()  # a fast tokenizer with truncation/padding is not thread-safe
        self._recent = LRU(256)  # the last answers, by (question, passages)
        self._sides = LRU(512)   # passage text -> PassageSide (with separate layers)
        self.stored: Optional[Callable[[Sequence[str]], dict[str, "PassageSide"]]] = None  # e.g. a state store's
        self._fingerprint: Optional[str] = None
        self._loaded: Optional[dict[str, torch.Tensor]] = None  # the saved weights, once cast to serve

    def check_config(self) -> None:
        """Raise if the config does not fit the base model."""
        n_layers = len(self.bert.encoder.layer)
        if self.config.joint not in JOINTS:
            raise ValueError(f"joint must be one of {JOINTS}, got {self.config.joint!r}.")
        if not 0 <= self.config.separate_layers < n_layers:
            raise ValueError(f"separate_layers must be in [0, {n_layers - 1}] for {self.config.base_path()} "
                             f"({n_layers} layers), got {self.config.separate_layers}.")

    def keep_layers(self, layers: Sequence[int]) -> "AnswerStartReader":
        """Keep only these of the reader's layers, in order (DistilBERT's start for a smaller student:
        e.g. ``[0, 2, 4]`` of 6 reads in half the time); ``config.layers`` records them as layers of
        the base model, so :meth:`from_pretrained` rebuilds the same reader."""
        current = self.config.layers if self.config.layers is not None else list(range(len(self.bert.encoder.layer)))
        self._keep(layers)
        self.config = replace(self.config, layers=[current[i] for i in layers])
        self.check_config()
        self.clear(passages=True)
        self._fingerprint = None
        return self

    def _keep(self, layers: Sequence[int]) -> None:
        have = len(self.bert.encoder.layer)
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < have for i in layers):
            raise ValueError(f"layers must be distinct indices in [0, {have - 1}] (the reader has {have} layers), "
                             f"got {list(layers)!r}.")
        self.bert.encoder.layer = nn.ModuleList([self.bert.encoder.layer[i] for i in layers])
        self.bert.config.num_hidden_layers = len(layers)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def train(self, mode: bool = True) -> "AnswerStartReader":
        if mode and self.head.weight.dtype != torch.float32:
            raise ValueError(f"This reader serves in {self.head.weight.dtype}; to train, load it in float32 with "
                             "AnswerStartReader.from_pretrained(folder).")
        self.clear(passages=True)  # weights may change: forget what was kept
        self._fingerprint = None
        if mode:
            self._loaded = None  # training changes the weights: save what they become
        return super().train(mode)

    def clear(self, passages: bool = False) -> None:
        """Forget the kept answers (e.g. to time a question as if it were new), and with
        ``passages`` the kept passage sides too."""
        self._recent.clear()
        if passages:
            self._sides.clear()

    def serve_in(self, dtype: torch.dtype) -> "AnswerStartReader":
        """Cast the reader to ``dtype`` to serve (e.g. ``serving_dtype(device)``). The weights it
        had are kept for :meth:`save_pretrained`, and :meth:`fingerprint` changes with the cast, so
        passage sides stored in another dtype are not read."""
        if dtype != self.head.weight.dtype:
            if self._loaded is None:
                self._loaded = self._state_to_save()
            self.to(dtype).eval()
        return self

    @property
    def separate(self) -> int:
        """How many of the first layers read the passage alone (0: none; all of them with a cross joint)."""
        return len(self.bert.encoder.layer) if self.cross is not None else self.config.separate_layers

    def to_cross(self) -> "AnswerStartReader":
        """Make this reader one whose every layer reads the passage alone and whose cross-attention
        reads it against the question (``joint="cross"``), the cross-attention started from the last
        layer's self-attention (a reader to distil from the joint one it was)."""
        self.config = replace(self.config, joint="cross", separate_layers=0)
        self.cross = CrossReading(self.bert.config).to(self.device)
        self.cross.start_from(self.bert.encoder.layer[-1].attention)
        self.check_config()
        self.clear(passages=True)
        self._fingerprint = None
        return self

    def fingerprint(self) -> str:
        """A hash of the config and weights: what a stored passage side depends on (computed once;
        :meth:`train` forgets it, as training changes the weights)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode() + MARKUP_VERSION.encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:24]
        return self._fingerprint

    def windows(self, questions: Sequence[str], passages: Sequence[str]) -> dict:
        """Tokenise (question, passage) pairs into windows that together cover every passage
        (no truncation): ids, masks, which pair each window is from, and each passage
        word-piece's character span in its passage (-1 for question and special tokens)."""
        with self._lock:
            enc = self._tokenize(questions, passages)
        spans = enc["offset_mapping"].clone()
        not_passage = torch.tensor([[s != 1 for s in enc.sequence_ids(w)] for w in range(spans.shape[0])])
        spans[not_passage] = -1
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc.get("token_type_ids"), "pair": enc["overflow_to_sample_mapping"],
                "spans": spans}

    def question_room(self) -> int:
        """The most word-pieces of a question that a window holds beside its passage: the window less
        its three special tokens and more than ``stride`` word-pieces of passage."""
        return self.config.max_length - self.config.stride - 4

    def read_questions(self, questions: Sequence[str]) -> list[str]:
        """Each question as the reader reads it: a question longer than :meth:`question_room` is read
        from its end (where it asks), with a warning that says how much of it the reader left out."""
        room, out = self.question_room(), list(questions)
        long = [i for i, q in enumerate(out) if len(q) > room]  # a word-piece spans at least one character
        if not long:
            return out
        enc = self.tokenizer([out[i] for i in long], add_special_tokens=False, return_offsets_mapping=True)
        for i, offsets in zip(long, enc["offset_mapping"]):
            q = out[i]
            if len(offsets) > room:
                start = offsets[len(offsets) - room][0]
                warnings.warn(f"The answer-start reader reads a question's last {room} word-pieces beside each "
                              f"passage; it left out the first {len(offsets) - room} of this one's "
                              f"{len(offsets)} (the decoder reads it whole).", QuestionCutWarning, stacklevel=4)
                out[i] = q[start:]
        return out

    def _tokenize(self, questions: Sequence[str], passages: Sequence[str]):
        return self.tokenizer(self.read_questions(questions), [without_markup(p) for p in passages],
                              truncation="only_second",
                              max_length=self.config.max_length, stride=self.config.stride,
                              return_overflowing_tokens=True, return_offsets_mapping=True,
                              padding=True, return_tensors="pt")

    def forward(self, batch: dict) -> torch.Tensor:
        """(W, T) start logits; positions that cannot start an answer (question, padding,
        special tokens except [CLS]) are -inf."""
        return self._start_logits(self._joint_states(batch), batch["spans"])

    def _joint_states(self, batch: dict) -> torch.Tensor:
        """(W, T, H) last states of MiniLM over :meth:`windows`' (question, passage) windows."""
        kw = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")
              if batch.get(k) is not None}
        return self.bert(**kw).last_hidden_state

    def char_log_probs(self, question: str, passages: Sequence[str]) -> list[dict[int, float]]:
        """For each passage, {character offset: log P(answer starts at the word-piece there)},
        normalised jointly over every passage's word-pieces and one "no answer" slot. The last
        256 answers are kept (scoring and generating the same question reuse them); training
        mode always recomputes."""
        return self._read(question, passages)[0]

    def no_answer_log_prob(self, question: str, passages: Sequence[str], nulls: str = "max") -> float:
        """log P("no answer here") for the question over all the passages; 0.0 without passages.
        ``nulls="max"``: the [CLS] slot of :meth:`char_log_probs`' joint normalisation (the most
        confident window's); ``"every"``: each window's [CLS] is a slot of its own beside the same
        starts (:func:`every_window_no_answer`), so every passage read adds its "no answer"."""
        _, null, every = self._read(question, passages)
        return null if check_nulls(nulls) == "max" else every

    def _read(self, question: str, passages: Sequence[str]) -> tuple[list[dict[int, float]], float, float]:
        if not passages:
            return [], 0.0, 0.0
        return self._recent.get_or_make((question, tuple(passages)),
                                        lambda: self._char_log_probs(question, passages), reuse=not self.training)

    @torch.no_grad()
    def _char_log_probs(self, question: str, passages: Sequence[str]
                        ) -> tuple[list[dict[int, float]], float, float]:
        logits, batch = self.read_pairs([question] * len(passages), passages)
        lps, null = joint_char_log_probs(logits.cpu(), batch, len(passages))
        return lps, null, every_window_no_answer(logits[:, 0].cpu(), null)

    def read_pairs(self, questions: Sequence[str], passages: Sequence[str], hidden: bool = False
                   ) -> tuple[torch.Tensor, dict]:
        """(W, T) start logits over the windows of (question, passage) pairs (as :meth:`forward`), and
        the windows' ``spans`` and ``pair``. With separate layers, each passage's side comes from
        :meth:`passage_sides` (kept, stored, or read now) and only the question is read per call.
        With ``hidden``, the batch also holds ``hidden``: the (W, T, H) states the head read."""
        if not self.separate:
            batch = self.windows(questions, passages)
            h = self._joint_states(batch)
            if hidden:
                batch["hidden"] = h
            return self._start_logits(h, batch["spans"]), batch
        sides = self.passage_sides(passages)
        unique = list(dict.fromkeys(questions))
        qside = dict(zip(unique, self._question_sides(unique)))
        if self.cross is not None:
            return self._read_across(questions, passages, sides, qside, hidden)
        rows, spans, pair = [], [], []
        for j, (q, p) in enumerate(zip(questions, passages)):
            side, hq = sides[p], qside[q]
            for w in range(side.hidden.shape[0]):
                keep = side.mask[w]
                rows.append(torch.cat([hq, side.hidden[w][keep].to(hq)]))
                spans.append(torch.cat([torch.full((hq.shape[0], 2), -1, dtype=torch.long),
                                        side.spans[w][keep.cpu()].long()]))
                pair.append(j)
        h = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], batch_first=True)
        batch = {"spans": nn.utils.rnn.pad_sequence(spans, batch_first=True, padding_value=-1),
                 "pair": torch.tensor(pair)}
        h = self._layers(h, mask.to(self.device), self.separate, len(self.bert.encoder.layer))
        if hidden:
            batch["hidden"] = h
        return self._start_logits(h, batch["spans"]), batch

    def _read_across(self, questions: Sequence[str], passages: Sequence[str], sides: dict[str, "PassageSide"],
                     qside: dict[str, torch.Tensor], hidden: bool) -> tuple[torch.Tensor, dict]:
        """The cross joint: every window of every pair, its passage side against its question's."""
        order = {q: i for i, q in enumerate(qside)}
        hp, mp, sp, pair, which = [], [], [], [], []
        for j, (q, p) in enumerate(zip(questions, passages)):
            side = sides[p]
            hp.append(side.hidden)
            mp.append(side.mask)
            sp.append(side.spans)
            pair += [j] * side.hidden.shape[0]
            which += [order[q]] * side.hidden.shape[0]
        T = max(h.shape[1] for h in hp)
        pad = lambda x, v: nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, T - x.shape[1]), value=v)  # noqa: E731
        Hp = torch.cat([pad(h, 0.0) for h in hp])
        Mp = torch.cat([pad(m, False) for m in mp])
        Sp = torch.cat([pad(s.long(), -1) for s in sp])
        qs = [qside[q] for q in order]
        Hq = nn.utils.rnn.pad_sequence(qs, batch_first=True)
        Mq = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in qs], batch_first=True)
        z, z_null = self.cross(Hp.to(Hq.dtype), Mp.to(Hq.device), Hq, Mq.to(Hq.device),
                               torch.tensor(which, device=Hq.device))
        h = torch.cat([z_null[:, None], z], 1)
        spans = torch.cat([torch.full((Sp.shape[0], 1, 2), -1, dtype=torch.long), Sp.cpu()], 1)
        batch = {"spans": spans, "pair": torch.tensor(pair)}
        if hidden:
            batch["hidden"] = h
        return self._start_logits(h, spans), batch

    def use_store(self, store) -> None:
        """Read passage sides from a :class:`~diekae_rag.state_store.PassageStateStore` (those stored
        for these weights) before reading a passage anew; ``None`` stops."""
        self.stored = None if store is None else (lambda texts: store.reader_sides(texts, self.fingerprint()))

    def passage_sides(self, passages: Sequence[str]) -> dict[str, "PassageSide"]:
        """Each passage read alone by the separate layers (needs ``separate_layers``): kept ones,
        then stored ones (:attr:`stored`), then the rest read now in one batch. Training mode reads
        every passage again, with gradients."""
        if not self.separate:
            raise ValueError("Passage sides need a reader with separate_layers > 0.")
        unique = list(dict.fromkeys(passages))
        if self.training:
            return dict(zip(unique, self._read_alone(unique)))
        found = self._sides.get_many(unique)
        todo = [p for p in unique if p not in found]
        if todo and self.stored is not None:
            read = {p: s.to(self.device) for p, s in self.stored(todo).items()}
            found.update(read)
            self._sides.put_many(read.items())
            todo = [p for p in todo if p not in read]
        if todo:
            with torch.no_grad():
                new = dict(zip(todo, self._read_alone(todo)))
            found.update(new)
            self._sides.put_many(new.items())
        return found

    def _read_alone(self, passages: Sequence[str]) -> list["PassageSide"]:
        """Passages without the question through the separate layers, in windows of
        ``max_length`` less a question's room (64, or half a short window) word-pieces (``stride``
        overlap) plus [SEP], positions from ``passage_position``."""
        with self._lock:
            enc = self.tokenizer([without_markup(p) for p in passages], add_special_tokens=False,
                                 return_offsets_mapping=True)
        size = self.config.max_length - min(64, self.config.max_length // 2)
        sep = self.tokenizer.sep_token_id
        ids, spans, owner = [], [], []
        for i, (tok, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            a = 0
            while True:
                ids.append(torch.tensor(tok[a: a + size] + [sep]))
                spans.append(torch.tensor([list(o) for o in offs[a: a + size]] + [[-1, -1]]).reshape(-1, 2))
                owner.append(i)
                if a + size >= len(tok):
                    break
                a += max(size - self.config.stride, 1)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in ids], batch_first=True)
        input_ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.tokenizer.pad_token_id)
        spans_t = nn.utils.rnn.pad_sequence(spans, batch_first=True, padding_value=-1)
        pos = self.config.passage_position + torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        dev = self.device
        h = self.bert.embeddings(input_ids=input_ids.to(dev), token_type_ids=torch.ones_like(input_ids).to(dev),
                                 position_ids=pos.to(dev))
        h = self._layers(h, mask.to(dev), 0, self.separate)
        out = []
        for i in range(len(passages)):
            rows = [w for w, o in enumerate(owner) if o == i]
            t = int(mask[rows].sum(1).max())
            out.append(PassageSide(h[rows, :t], mask[rows, :t].to(dev), spans_t[rows, :t].to(torch.int32)))
        return out

    def _question_sides(self, questions: Sequence[str]) -> list[torch.Tensor]:
        """Each question as [CLS] question [SEP] through the separate layers: (length, hidden)."""
        with self._lock:
            enc = self.tokenizer(self.read_questions(questions), padding=True, return_tensors="pt")
        dev = self.device
        mask = enc["attention_mask"].bool().to(dev)
        h = self.bert.embeddings(input_ids=enc["input_ids"].to(dev), token_type_ids=enc["token_type_ids"].to(dev))
        h = self._layers(h, mask, 0, self.separate)
        return [h[i, : int(mask[i].sum())] for i in range(len(questions))]

    def _layers(self, h: torch.Tensor, mask: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """MiniLM layers ``first`` to ``stop - 1`` over ``h`` (B, T, H); ``mask`` (B, T) is False on padding."""
        add = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, torch.finfo(h.dtype).min)
        for layer in self.bert.encoder.layer[first:stop]:
            out = layer(h, attention_mask=add[:, None, None, :])
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _start_logits(self, h: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        allowed = spans[..., 0].to(self.device) >= 0
        allowed[:, 0] = True
        return self.head(h).squeeze(-1).float().masked_fill(~allowed, float("-inf"))

    def _state_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()
                if not k.endswith(FROZEN)}

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write reader.json + reader.safetensors (the frozen word embeddings are left out; a reader
        cast with :meth:`serve_in` writes the weights it had before)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self._loaded or self._state_to_save()
        atomic_write(path / READER_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
        atomic_write_text(path / READER_CONFIG, json.dumps(asdict(self.config), indent=2, sort_keys=True))
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Optional[Union[str, torch.device]] = None
                        ) -> "AnswerStartReader":
        """Load a reader saved by :meth:`save_pretrained` onto its base MiniLM."""
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / READER_CONFIG).exists() or not (path / READER_WEIGHTS).exists():
            raise FileNotFoundError(f"No answer-start reader in {path}: expected {READER_CONFIG} and "
                                    f"{READER_WEIGHTS} (train one with `diekae-rag train-reader CONFIG`).")
        cfg = ReaderConfig.from_dict(json.loads((path / READER_CONFIG).read_text()))
        reader = cls(cfg)
        state = load_file(str(path / READER_WEIGHTS))
        missing, unexpected = reader.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        missing = [k for k in missing if not k.endswith(FROZEN)]
        if missing or unexpected:
            raise ValueError(f"Reader weights in {path} do not fit its base {cfg.base_path()}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
        return reader.to(device or "cpu").eval()


def serving_dtype(device: torch.device) -> torch.dtype:
    """The dtype a reader serves in on ``device``: bfloat16 on a CPU with native bfloat16 matrix
    products (AVX512-BF16 or AMX), where MiniLM runs about 2.5 times faster with the same dev rows
    (docs/results.md §3b); float32 elsewhere."""
    if device.type != "cpu":
        return torch.float32
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # a torch without these probes
        native = False
    return torch.bfloat16 if native else torch.float32


JOINTS = ("layers", "cross")


class CrossReading(nn.Module):
    """One multi-head cross-attention each way between a passage read alone and its question read
    alone, then the reader's head reads its output.

    Starts: each passage word-piece attends over the question's word-pieces, ``z = LN(h + out)``.
    "No answer": the question's [CLS] attends over the window's word-pieces, ``z0 = LN(q_cls + out0)``.
    Both are computed with the projections folded onto the question's side (scores ``h · (Wq_h^T Wk_h q_j)``,
    outputs ``Σ α (Wo_h Wv_h q_j)``; for "no answer" the passage states are pooled before ``Wo_h Wv_h``),
    so a passage word-piece costs about 2 × heads × question length multiply-adds per hidden unit and no
    hidden × hidden product."""

    def __init__(self, config) -> None:
        super().__init__()
        H, self.heads = config.hidden_size, config.num_attention_heads
        self.hd = H // self.heads
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))        # passage -> question
        self.q0, self.k0, self.v0, self.o0 = (nn.Linear(H, H) for _ in range(4))    # [CLS] -> passage
        self.norm, self.norm0 = nn.LayerNorm(H, eps=config.layer_norm_eps), nn.LayerNorm(H, eps=config.layer_norm_eps)

    def start_from(self, attention: nn.Module) -> None:
        """Copy a BERT layer's self-attention (query, key, value, output dense and LayerNorm) into both ways."""
        own = attention.self
        with torch.no_grad():
            for mine in ((self.q, self.k, self.v, self.o, self.norm), (self.q0, self.k0, self.v0, self.o0, self.norm0)):
                for m, theirs in zip(mine, (own.query, own.key, own.value, attention.output.dense,
                                            attention.output.LayerNorm)):
                    m.load_state_dict(theirs.state_dict())

    def _heads(self, lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(heads, hd, H) weight and (heads, hd) bias of a projection."""
        return lin.weight.view(self.heads, self.hd, -1), lin.bias.view(self.heads, self.hd)

    def forward(self, hp: torch.Tensor, mp: torch.Tensor, hq: torch.Tensor, mq: torch.Tensor,
                which: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``hp`` (W, T, H) passage windows, ``mp`` (W, T) False on padding, ``hq`` (U, L, H) the
        questions, ``mq`` (U, L), ``which`` (W,) each window's question (default: window i reads
        question i): the (W, T, H) states at the word-pieces and the (W, H) "no answer" states. A
        question's folded keys and outputs are made once, however many windows read it."""
        which = torch.arange(hp.shape[0], device=hp.device) if which is None else which
        scale = self.hd ** -0.5
        wq, bq = self._heads(self.q)
        wk, bk = self._heads(self.k)
        wv, bv = self._heads(self.v)
        wo = self.o.weight.view(-1, self.heads, self.hd)                      # (H, heads, hd)
        kq = torch.einsum("nhd,uld->unlh", wk, hq) + bk[None, :, None]        # (U, n, L, hd) question keys
        keys = torch.einsum("nhe,unlh->unle", wq, kq) * scale                 # (U, n, L, H): Wq^T k
        kbias = torch.einsum("nh,unlh->unl", bq, kq) * scale                  # the query bias's part
        vq = torch.einsum("nhd,uld->unlh", wv, hq) + bv[None, :, None]        # (U, n, L, hd)
        outs = torch.einsum("enh,unlh->unle", wo, vq)                         # (U, n, L, H): Wo_n v
        att = torch.einsum("wte,wnle->wntl", hp, keys[which]) + kbias[which][:, :, None]
        att = att.masked_fill(~mq[which][:, None, None, :], torch.finfo(att.dtype).min).softmax(-1)
        z = self.norm(hp + torch.einsum("wntl,wnle->wte", att, outs[which]) + self.o.bias)
        # "no answer": the question's [CLS] over the window's word-pieces
        wq0, bq0 = self._heads(self.q0)
        wk0, bk0 = self._heads(self.k0)
        wv0, bv0 = self._heads(self.v0)
        cls = hq[which, 0]
        q0 = torch.einsum("nhd,wd->wnh", wq0, cls) + bq0                      # (W, n, hd)
        u = torch.einsum("nhe,wnh->wne", wk0, q0) * scale                     # (W, n, H): Wk^T q
        att0 = torch.einsum("wte,wne->wnt", hp, u) + (torch.einsum("nh,wnh->wn", bk0, q0) * scale)[..., None]
        att0 = att0.masked_fill(~mp[:, None], torch.finfo(att0.dtype).min).softmax(-1)
        pooled = torch.einsum("wnt,wte->wne", att0, hp)                       # (W, n, H)
        v0 = torch.einsum("nhe,wne->wnh", wv0, pooled) + bv0                  # (W, n, hd)
        z0 = self.norm0(cls + self.o0(v0.reshape(v0.shape[0], -1)))
        return z, z0


@dataclass
class PassageSide:
    """A passage read alone by the reader's separate layers, one row per window."""
    hidden: torch.Tensor  # (windows, T, hidden) states after the separate layers
    mask: torch.Tensor    # (windows, T) False on padding
    spans: torch.Tensor   # (windows, T, 2) each word-piece's character span; -1 for [SEP] and padding

    def to(self, device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> "PassageSide":
        return PassageSide(self.hidden.to(device, dtype), self.mask.to(device), self.spans)


def joint_char_log_probs(logits: torch.Tensor, batch: dict, n_passages: int) -> tuple[list[dict[int, float]], float]:
    """Per passage, {character offset: log-probability} from (W, T) window ``logits``, normalised
    jointly over every passage's word-pieces and one "no answer" slot (the best [CLS] logit), and
    that slot's log-probability. The offset is each word-piece's first character; where windows
    overlap, the higher logit counts."""
    null = logits[:, 0].max()
    out: list[dict[int, float]] = [{} for _ in range(n_passages)]
    starts = batch["spans"][:, :, 0].tolist()
    for row, chars, p in zip(logits.tolist(), starts, batch["pair"].tolist()):
        best = out[p]
        for v, c in zip(row[1:], chars[1:]):
            if math.isfinite(v) and v > best.get(c, -math.inf):
                best[c] = v
    every = torch.tensor([v for s in out for v in s.values()] + [float(null)])
    norm = float(torch.logsumexp(every, 0))
    return [{c: v - norm for c, v in s.items()} for s in out], float(null) - norm


def check_nulls(nulls: str) -> str:
    """``nulls`` if it names a way to read "no answer" over several windows, else a ValueError."""
    if nulls not in GATE_NULLS:
        raise ValueError(f"nulls must be one of {GATE_NULLS} (how the windows' [CLS] slots make one "
                         f"\"no answer\"), got {nulls!r}.")
    return nulls


def every_window_no_answer(cls_logits: torch.Tensor, null: float) -> float:
    """log P("no answer") when each window's [CLS] logit (``cls_logits``, (W,)) is a slot of its own
    beside the starts of :func:`joint_char_log_probs`, whose "no answer" (the best window's slot) is
    ``null``. With one window it is ``null``."""
    if cls_logits.numel() == 1 or null >= 0.0:  # one window, or no start has any mass
        return null
    top = float(cls_logits.max())
    every = float(torch.logsumexp(cls_logits.float(), 0))
    log_starts = top - null + math.log1p(-math.exp(null))  # the starts' summed exp(logit)
    return every - float(np.logaddexp(log_starts, every))
