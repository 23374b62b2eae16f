"""CopyConfig: the copy readout's serving-time settings, apart from the weights.

Like a ``GenerationConfig``: saved as ``copy.json`` beside the encoders, its defaults are the
shipped values, and any call can override it (``model.generate(..., copy={"sharpness": 1})``).
None of these settings changes a weight; :meth:`CopyConfig.plain` is the readout as trained.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

COPY_NAME = "copy.json"
GATE_NULLS = ("max", "every")  # how the gate's "no answer" reads several windows (CopyConfig.gate_nulls)
READER_GATES = ("gate_no_answer", "gate_given_answers", "gate_no_answer_turns")  # the gate's thresholds on the reader
GATE_OFF = {"gate_cosine": 0.0, **{name: 1.0 for name in READER_GATES}, "gate_ramp": 0.0}  # copy=GATE_OFF: no gate

# The names these settings had when they lived in the encoder config (checkpoint format 1).
FORMAT1_NAMES = {
    "pointer_gain_scale": "gain_scale", "pointer_sharpness": "sharpness", "pointer_first_gain": "first_gain",
    "pointer_bigram_bonus": "bigram_bonus", "pointer_continue_bonus": "continue_bonus",
    "passage_prior": "passage_prior", "reader_weight": "reader_weight",
    "pointer_first_unspaced": "first_unspaced", "pointer_answer_pieces": "answer_pieces",
    "pointer_whitened_values": "whitened_values",
}


@dataclass(frozen=True)
class CopyConfig:
    """How the copy readout turns the pointer's scores into what it writes (see :func:`copy_scores`).

    ``gain_scale``: the learned per-head gain is multiplied by this. ``sharpness``: every score,
    the "nothing" slot's too, is multiplied by this before the softmax. ``first_gain``: the copy
    at the position that predicts the answer's first token is multiplied by this.
    ``first_key_scale``: at that position the key term of the pointer's score is multiplied by this
    and the "nothing" slot is left out of the choice (the keys come from each passage alone and cannot
    read the question; below 1 the answer-start reader and the passage prior weigh more in the first
    copy, at 0 they alone choose it). It acts only with the reader on (``reader_weight`` > 0);
    without it the keys choose the first copy as trained.
    ``bigram_bonus``: added where the two tokens before a slot equal the last two written.
    ``continue_bonus``: times the attention the previous position gave the slot a slot continues.
    ``passage_prior``: strength of the question-passage cosine prior (0: off). ``reader_weight``:
    weight of the answer-start reader's log-probabilities at the answer's first position (0: off).
    ``start_merge``: the reader's starts of at least this probability that lie at most two words
    apart with no punctuation between ("the Merrow Guild": "the", "Merrow") are read as one answer,
    whose summed probability goes to the likeliest of them (0: off).
    ``reader_margin``: the reader reads only the passages whose MiniLM cosine to the question (the
    passage prior's) lies within this of the best passage's; the others get no answer start, in the
    copy and in the gate's "no answer" alike (0, or a model without the passage embedder: it reads every
    passage; the shipped 0.3 leaves out only passages the prior already rules out, docs/results.md §3b).
    ``first_unspaced``: the first copy writes a passage token as an answer starts it (no space).
    ``answer_pieces``: extra slots that continue a word written with other pieces than the passage's.
    ``whitened_values``: write the direction that raises the copied token's logit alone.

    The gate (:mod:`diekae_rag.copy.gate`) decides per question whether the passages answer it;
    where it closes, the decoder sees exactly what it sees with no knowledge. ``gate_cosine``: it
    closes when no passage's MiniLM cosine to the question reaches this (0: off). ``gate_no_answer``:
    it closes when the answer-start reader's probability of "no answer here" exceeds this (1: off).
    ``gate_nulls``: how that probability reads several windows (passages, or a long passage's
    parts): ``"every"``, each window's "no answer" is a slot of its own beside the starts, so every
    passage read that does not answer adds to it; ``"max"``, the reader's joint normalisation, whose
    one "no answer" slot is the most confident window's (one window: the two are the same).
    ``gate_ramp``: below that threshold, over a ramp this wide, the gate is half-open: everything the
    encoders write (rows and copy) is scaled by ``(gate_no_answer - P) / gate_ramp``, from 1 at
    ``gate_no_answer - gate_ramp`` down to 0 at the threshold (0: no ramp, the gate is open or closed).
    ``gate_given_answers``: where the question is read with earlier turns that gave answers, the gate
    also closes when the reader's "no answer" and its starts on those answers together exceed this
    (1: off): a follow-up whose passages hold only what was already said (single-turn questions never
    read it; :meth:`~diekae_rag.copy.providers.GivenAnswersSkipped.given_or_no_answer_log_prob`).
    ``gate_no_answer_turns``: where the question is read with earlier turns, the gate also closes when
    the reader's P(no answer) exceeds this, with no ramp (1: off). With ``alone_first`` those are the
    follow-ups whose last question alone the reader found no answer for: read with their turns, they
    must be answered surely to pass.
    ``question_turns``: how much of a conversation the passage prior, the answer-start reader and
    the gate read as the question: the last user turn and up to ``question_turns - 1`` turns before
    it (1: the last user turn alone; 3: with the previous question and its answer).
    ``alone_first``: with ``question_turns`` > 1, a follow-up is read alone where the answer-start
    reader's P(no answer) for the last user turn alone (read as ``gate_nulls`` says) is at most this,
    and with its earlier turns only elsewhere: a follow-up that names what it asks about ("When did
    the Normans conquer England?") reads as the single question it is, and one that does not ("Where
    was she born?") with the turns it needs (0: off, always with its turns).
    ``on_no_answer``: where it closes, ``"decoder"`` answers from its own knowledge and
    ``"abstain"`` returns ``no_answer_text``.
    """

    gain_scale: float = 140.0
    sharpness: float = 2.0
    first_gain: float = 1.4
    first_key_scale: float = 0.0
    bigram_bonus: float = 3.0
    continue_bonus: float = 1024.0
    passage_prior: float = 30.0
    reader_weight: float = 4.0
    start_merge: float = 0.0
    reader_margin: float = 0.3
    first_unspaced: bool = True
    answer_pieces: bool = True
    whitened_values: bool = True
    gate_cosine: float = 0.0
    gate_no_answer: float = 0.7
    gate_nulls: str = "every"
    gate_ramp: float = 0.3
    gate_given_answers: float = 0.97
    gate_no_answer_turns: float = 0.1
    question_turns: int = 3
    alone_first: float = 0.7
    on_no_answer: str = "decoder"
    no_answer_text: str = "The documents do not say."

    def __post_init__(self) -> None:
        for name in ("gain_scale", "sharpness", "first_gain"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"CopyConfig.{name} must be a positive number, got {value!r}.")
        for name in ("first_key_scale", "bigram_bonus", "continue_bonus", "passage_prior", "reader_weight",
                     "reader_margin"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"CopyConfig.{name} must be 0 (off) or a positive number, got {value!r}.")
        for name in ("first_unspaced", "answer_pieces", "whitened_values"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CopyConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if not (isinstance(self.start_merge, (int, float)) and not isinstance(self.start_merge, bool)
                and 0 <= self.start_merge < 1):
            raise ValueError(f"CopyConfig.start_merge must be in [0, 1) (0: off), got {self.start_merge!r}.")
        if not (isinstance(self.gate_cosine, (int, float)) and 0 <= self.gate_cosine < 1):
            raise ValueError(f"CopyConfig.gate_cosine must be in [0, 1) (0: off), got {self.gate_cosine!r}.")
        if not (isinstance(self.gate_no_answer, (int, float)) and 0 < self.gate_no_answer <= 1):
            raise ValueError(f"CopyConfig.gate_no_answer must be in (0, 1] (1: off), got {self.gate_no_answer!r}.")
        if not (isinstance(self.gate_given_answers, (int, float)) and not isinstance(self.gate_given_answers, bool)
                and 0 < self.gate_given_answers <= 1):
            raise ValueError("CopyConfig.gate_given_answers must be in (0, 1] (1: off), "
                             f"got {self.gate_given_answers!r}.")
        if not (isinstance(self.gate_no_answer_turns, (int, float)) and not isinstance(self.gate_no_answer_turns, bool)
                and 0 < self.gate_no_answer_turns <= 1):
            raise ValueError("CopyConfig.gate_no_answer_turns must be in (0, 1] (1: off), "
                             f"got {self.gate_no_answer_turns!r}.")
        if self.gate_nulls not in GATE_NULLS:
            raise ValueError(f"CopyConfig.gate_nulls must be one of {GATE_NULLS}, got {self.gate_nulls!r}.")
        if not (isinstance(self.gate_ramp, (int, float)) and not isinstance(self.gate_ramp, bool)
                and 0 <= self.gate_ramp < 1):
            raise ValueError(f"CopyConfig.gate_ramp must be in [0, 1) (0: no ramp), got {self.gate_ramp!r}.")
        if self.gate_no_answer < 1 and self.gate_ramp > self.gate_no_answer:
            raise ValueError(f"CopyConfig.gate_ramp ({self.gate_ramp}) must not exceed gate_no_answer "
                             f"({self.gate_no_answer}): the ramp lies below the threshold. Lower gate_ramp too.")
        if not (isinstance(self.question_turns, int) and not isinstance(self.question_turns, bool)
                and self.question_turns >= 1):
            raise ValueError(f"CopyConfig.question_turns must be a whole number of turns >= 1, got {self.question_turns!r}.")
        if not (isinstance(self.alone_first, (int, float)) and not isinstance(self.alone_first, bool)
                and 0 <= self.alone_first <= 1):
            raise ValueError(f"CopyConfig.alone_first must be in [0, 1] (0: off), got {self.alone_first!r}.")
        if self.on_no_answer not in ("decoder", "abstain"):
            raise ValueError(f"CopyConfig.on_no_answer must be 'decoder' or 'abstain', got {self.on_no_answer!r}.")
        if not isinstance(self.no_answer_text, str) or not self.no_answer_text.strip():
            raise ValueError("CopyConfig.no_answer_text must be a non-empty sentence.")

    def gate_strength(self, no_answer: float) -> float:
        """How far the reader's gate opens for P("no answer") = ``no_answer``: 1 open, 0 closed,
        in between on the ramp (1 when the reader's gate is off)."""
        if self.gate_no_answer >= 1:
            return 1.0
        if no_answer > self.gate_no_answer:
            return 0.0
        if not self.gate_ramp:
            return 1.0
        return min(1.0, max(0.0, (self.gate_no_answer - no_answer) / self.gate_ramp))

    @property
    def gated(self) -> bool:
        """Whether the gate can close (a threshold is set)."""
        return self.gate_cosine > 0 or self.reader_gated

    @property
    def reader_gated(self) -> bool:
        """Whether the gate reads the answer-start reader (a threshold of :data:`READER_GATES` set)."""
        return any(getattr(self, name) < 1 for name in READER_GATES)

    @classmethod
    def plain(cls) -> "CopyConfig":
        """The readout as trained: learned scores only, no serving-time term."""
        return cls(gain_scale=100.0, sharpness=1.0, first_gain=1.0, first_key_scale=1.0, bigram_bonus=0.0,
                   continue_bonus=0.0, passage_prior=0.0, reader_weight=0.0, reader_margin=0.0, first_unspaced=False,
                   answer_pieces=False, whitened_values=False, gate_no_answer=1.0, gate_ramp=0.0,
                   gate_given_answers=1.0, gate_no_answer_turns=1.0, question_turns=1, alone_first=0.0)

    def replace(self, **changes: Any) -> "CopyConfig":
        """A copy with ``changes``; an unknown name raises with the list of settings."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ValueError(f"Unknown copy settings {unknown}; the settings are {', '.join(FIELDS)}.")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, copy: Union["CopyConfig", Mapping[str, Any], None]) -> "CopyConfig":
        """``copy`` itself (a CopyConfig), this config with ``copy``'s fields changed (a dict), or this one."""
        if copy is None:
            return self
        if isinstance(copy, CopyConfig):
            return copy
        if isinstance(copy, Mapping):
            return self.replace(**copy)
        raise TypeError(f"copy= takes a CopyConfig or a dict of its fields, got {type(copy).__name__}.")

    def check_for(self, encoder_config) -> None:
        """Raise ValueError when a setting needs a part the encoders do not have."""
        isolated, match = _parts(encoder_config)
        needs = {
            "passage_prior": (self.passage_prior > 0, isolated, "a pointer over isolated passages"),
            "reader_weight": (self.reader_weight > 0, isolated, "a pointer over isolated passages"),
            "answer_pieces": (self.answer_pieces, isolated and match, "the token match over isolated passages"),
            "bigram_bonus": (self.bigram_bonus > 0, match, "the token match (pointer_match)"),
            "continue_bonus": (self.continue_bonus > 0, match, "the token match (pointer_match)"),
        }
        for name, (on, available, what) in needs.items():
            if on and not available:
                raise ValueError(f"CopyConfig.{name} needs {what}, which these encoders do not have: "
                                 f"set {name} to its off value (copy={{'{name}': 0}}) or use encoders that have it.")

    def for_encoder(self, encoder_config) -> "CopyConfig":
        """This config with the settings the encoders cannot use switched off."""
        isolated, match = _parts(encoder_config)
        return dataclasses.replace(
            self, passage_prior=self.passage_prior if isolated else 0.0,
            reader_weight=self.reader_weight if isolated else 0.0,
            answer_pieces=self.answer_pieces and isolated and match,
            bigram_bonus=self.bigram_bonus if match else 0.0, continue_bonus=self.continue_bonus if match else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CopyConfig":
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ValueError(f"Unknown copy settings {unknown}; the settings are {', '.join(FIELDS)}.")
        return cls(**data)

    def save(self, folder: Union[str, Path]) -> Path:
        from ..atomic import atomic_write_text
        path = Path(folder) / COPY_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: Union[str, Path]) -> Optional["CopyConfig"]:
        """The ``copy.json`` in ``folder``, or None when there is none."""
        path = Path(folder) / COPY_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return cls.from_dict(data)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"Cannot read copy settings {path}: {exc}. Fix the file or delete it "
                             "(the readout then uses the settings saved with the weights).") from exc


def _parts(encoder_config) -> tuple[bool, bool]:
    """Whether the encoders have a copy readout over isolated passages, and one with the token match."""
    has_pointer = encoder_config.pointer_layer is not None
    return has_pointer and encoder_config.passage_isolation, has_pointer and encoder_config.pointer_match


FIELDS = tuple(f.name for f in dataclasses.fields(CopyConfig))
