"""Answer-start reader: a small question-aware side encoder that says where an answer starts.

The pointer's keys are computed from each passage alone (so passages can be cached), which
means only the query side can choose *which* span to copy. This reader is the question-aware
half: a MiniLM (the retriever's own embedder, fine-tuned as an extractive reader) reads each
(question, passage) pair and scores every word-piece as the start of the answer. Its
log-probabilities, mapped onto the decoder's passage tokens, are added to the pointer's scores
at the one position that predicts the answer's first token (``CopyConfig.reader_weight``,
through :class:`diekae_rag.copy.ReaderScores`).
The decoder still reads only the question.

Saved like the encoders (PEFT-style): ``reader.json`` + ``reader.safetensors``, holding the head
and every MiniLM weight except the word embeddings, which stay frozen and come from the
installed MiniLM package.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .atomic import atomic_write, atomic_write_text
from .lru import LRU

READER_CONFIG = "reader.json"
READER_WEIGHTS = "reader.safetensors"
FROZEN = "embeddings.word_embeddings.weight"
from .copy.memory import LOG_FLOOR  # log-probability given to a token no answer can start at


@dataclass
class ReaderConfig:
    base: str = ""            # MiniLM folder ("" = the installed all-MiniLM-L6-v2)
    max_length: int = 256     # word-pieces per window (question + passage)
    stride: int = 64          # overlap between windows of a long passage

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
        self.head = nn.Linear(self.bert.config.hidden_size, 1)
        self._lock = threading.Lock()  # a fast tokenizer with truncation/padding is not thread-safe
        self._recent = LRU(256)  # the last answers, by (question, passages)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def train(self, mode: bool = True) -> "AnswerStartReader":
        self.clear()  # weights may change: forget the kept answers
        return super().train(mode)

    def clear(self) -> None:
        """Forget the kept answers (e.g. to time a question as if it were new)."""
        self._recent.clear()

    def windows(self, questions: Sequence[str], passages: Sequence[str]) -> dict:
        """Tokenise (question, passage) pairs into windows that together cover every passage
        (no truncation): ids, masks, which pair each window is from, and each passage
        word-piece's character span in its passage (-1 for question and special tokens)."""
        with self._lock:
            enc = self._tokenize(questions, passages)
        spans = enc["offset_mapping"].clone()
        for w in range(spans.shape[0]):
            seq = enc.sequence_ids(w)
            for t, s in enumerate(seq):
                if s != 1:
                    spans[w, t] = -1
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc.get("token_type_ids"), "pair": enc["overflow_to_sample_mapping"],
                "spans": spans}

    def _tokenize(self, questions: Sequence[str], passages: Sequence[str]):
        return self.tokenizer(list(questions), list(passages), truncation="only_second",
                             max_length=self.config.max_length, stride=self.config.stride,
                             return_overflowing_tokens=True, return_offsets_mapping=True,
                             padding=True, return_tensors="pt")

    def forward(self, batch: dict) -> torch.Tensor:
        """(W, T) start logits; positions that cannot start an answer (question, padding,
        special tokens except [CLS]) are -inf."""
        kw = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "token_type_ids")
              if batch.get(k) is not None}
        h = self.bert(**kw).last_hidden_state
        allowed = batch["spans"][..., 0].to(self.device) >= 0
        allowed[:, 0] = True
        return self.head(h).squeeze(-1).float().masked_fill(~allowed, float("-inf"))

    def char_log_probs(self, question: str, passages: Sequence[str]) -> list[dict[int, float]]:
        """For each passage, {character offset: log P(answer starts at the word-piece there)},
        normalised jointly over every passage's word-pieces and one "no answer" slot. The last
        256 answers are kept (scoring and generating the same question reuse them); training
        mode always recomputes."""
        return self._read(question, passages)[0]

    def no_answer_log_prob(self, question: str, passages: Sequence[str]) -> float:
        """log P("no answer here") for the question over all the passages (the [CLS] slot of
        :meth:`char_log_probs`' joint normalisation); 0.0 without passages."""
        return self._read(question, passages)[1]

    def _read(self, question: str, passages: Sequence[str]) -> tuple[list[dict[int, float]], float]:
        if not passages:
            return [], 0.0
        return self._recent.get_or_make((question, tuple(passages)),
                                        lambda: self._char_log_probs(question, passages), reuse=not self.training)

    @torch.no_grad()
    def _char_log_probs(self, question: str, passages: Sequence[str]) -> tuple[list[dict[int, float]], float]:
        batch = self.windows([question] * len(passages), passages)
        return joint_char_log_probs(self(batch).cpu(), batch, len(passages))

    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write reader.json + reader.safetensors (the frozen word embeddings are left out)."""
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.endswith(FROZEN)}
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


def joint_char_log_probs(logits: torch.Tensor, batch: dict, n_passages: int) -> tuple[list[dict[int, float]], float]:
    """Per passage, {character offset: log-probability} from (W, T) window ``logits``, normalised
    jointly over every passage's word-pieces and one "no answer" slot (the best [CLS] logit), and
    that slot's log-probability. The offset is each word-piece's first character; where windows
    overlap, the higher logit counts."""
    null = logits[:, 0].max()
    out: list[dict[int, float]] = [{} for _ in range(n_passages)]
    for w in range(logits.shape[0]):
        p = int(batch["pair"][w])
        for t in torch.nonzero(torch.isfinite(logits[w, 1:]))[:, 0].tolist():
            c = int(batch["spans"][w, t + 1, 0])
            out[p][c] = max(out[p].get(c, -math.inf), float(logits[w, t + 1]))
    every = torch.tensor([v for s in out for v in s.values()] + [float(null)])
    norm = float(torch.logsumexp(every, 0))
    return [{c: v - norm for c, v in s.items()} for s in out], float(null) - norm


def token_log_probs(char_lp: dict[int, float], offsets: Sequence[tuple[int, int]]) -> list[float]:
    """Map character log-probs onto tokens given by their character spans: a token gets the
    best start inside its span (so " Ithp" gets the score of "Ithp"), else ``LOG_FLOOR``."""
    out = []
    for a, b in offsets:
        best = max((char_lp[c] for c in range(a, b) if c in char_lp), default=LOG_FLOOR)
        out.append(max(best, LOG_FLOOR))
    return out
