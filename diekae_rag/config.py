"""DiekaeConfig: everything needed to rebuild a set of DIEKÆ encoders, stored as JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

FORMAT_VERSION = 1


def decoder_fingerprint(decoder_config: Any) -> str:
    """A short hash of the decoder properties the encoders depend on (shape and vocabulary)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    src = decoder_config.to_dict() if hasattr(decoder_config, "to_dict") else dict(decoder_config)
    blob = json.dumps({k: src.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


PIECE_KEYS = ("covering", "after", "both")


def split_setting(spec: str) -> tuple[str, str]:
    """``"FIELD=TEXT"`` -> ``(field, text)``, checking that FIELD is a DiekaeConfig field."""
    name, sep, text = spec.partition("=")
    if not sep or name not in {f.name for f in dataclasses.fields(DiekaeConfig)}:
        raise ValueError(f"{spec!r}: write FIELD=VALUE with a DiekaeConfig field.")
    return name, text


def parse_settings(specs: Sequence[str]) -> dict[str, Any]:
    """``["FIELD=JSON", ...]`` -> ``{field: value}`` for DiekaeConfig fields (serving-time settings
    given on a command line, e.g. ``pointer_continue_bonus=0`` or ``'pointer_piece_keys="both"'``)."""
    out = {}
    for spec in specs:
        name, value = split_setting(spec)
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{spec!r}: the value must be JSON (text in double quotes: "
                             f"'{name}=\"text\"').") from exc
    return out


def parse_grid(specs: Sequence[str]) -> dict[str, list]:
    """``["FIELD=V1,V2", ...]`` -> ``{field: [v1, v2]}`` for a sweep over settings. Each value is read as
    JSON (``true`` / ``false`` are booleans, numbers are numbers); a value that is not JSON is text."""
    grid = {}
    for spec in specs:
        name, values = split_setting(spec)
        grid[name] = [_json_or_text(v) for v in values.split(",")]
    return grid


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class DiekaeConfig:
    """Shape and behaviour of one set of DIEKÆ encoders attached to one decoder.

    The default is the paper's form: encoders for layers 3-8 whose rows are added to
    the MLP outputs at the question's positions only (``per_step=False``, no pointer).
    """

    decoder_name: str = "embedded:SmolLM2-135M-Instruct"
    decoder_fingerprint: str = ""
    hidden_size: int = 576
    vocab_size: int = 49152
    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    d_enc: int = 128
    n_blocks: int = 4
    n_heads: int = 4
    max_knowledge_tokens: int = 1024
    knowledge_prefix: str = "Imagine that {"
    knowledge_suffix: str = "} "
    passage_separator: str = "\n"
    # Per-step injection: the encoder also reads the answer so far, every position gets a row.
    per_step: bool = False
    # Pointer readout: copy-attention over knowledge tokens into this layer's MLP output.
    pointer_layer: Optional[int] = None
    pointer_heads: int = 1
    pointer_key_dim: int = 64
    pointer_gain_scale: float = 100.0
    # Multiplies every pointer score (keys, token-match bonus and the "nothing" slot): above 1
    # the copy-attention is sharper, so the readout pushes one knowledge token, not a blend.
    pointer_sharpness: float = 1.0
    # Multiplies the pointer's output at the one position that predicts the answer's first token
    # (where it chooses what to copy); later steps keep the trained gain, so answers still stop.
    pointer_first_gain: float = 1.0
    # Passage prior: with several passages, every knowledge token's pointer score gets
    # passage_prior * (cos(question, its passage) - best passage's cos), cosines from the
    # retriever's sentence embedder (diekae_rag.passage_prior); 0 = off. Needs passage_isolation.
    passage_prior: float = 0.0
    # Token match: a learned bonus on pointer scores where the knowledge token before a key equals
    # the query's own token (an explicit induction prior, so a copied name continues where it is).
    pointer_match: bool = False
    pointer_match_scale: float = 100.0
    # Bigram match: a fixed extra bonus (in pointer-score units) where the knowledge token two
    # before a key also equals the query's previous token; 0 = off. Needs pointer_match.
    pointer_bigram_bonus: float = 0.0
    # First-token scorer: hidden width of a small MLP that, at the position predicting the answer's
    # first token only, adds a score to every knowledge token from the question's pointer state and
    # the token's own passage states (at s-1 and s), so choosing *which* fact to copy can use the
    # question; 0 = off. Its passage side is cached with each passage.
    pointer_first_scorer: int = 0
    # Answer-start reader (diekae_rag.answer_reader, saved next to the encoders as reader.*): a
    # question-aware MiniLM reads each (question, passage) pair; reader_weight * its log P(answer
    # starts here) is added to each passage token's pointer score at the position predicting the
    # answer's first token only; 0 = off. Needs pointer_layer and passage_isolation.
    reader_weight: float = 0.0
    # At the position predicting the answer's first token, copy each passage token as its variant
    # without the leading space (" Ithp" -> "Ithp"), as a chat answer's first token is written.
    pointer_first_unspaced: bool = False
    # Answer pieces (diekae_rag.answer_pieces): extra pointer slots for the later pieces of every
    # word whose answer-start tokenisation differs from the passage's ("I|th|pel|ith" for " Ith|pel|ith"),
    # so the token match can continue a name after its first piece. Needs pointer_match and isolation.
    pointer_answer_pieces: bool = False
    # Which key an answer piece borrows: "covering" (of the passage token covering the piece's first
    # character), "after" (of the slot after the token holding the previous piece's last character:
    # the key made where the copy has reached) or "both" (two slots per piece, one with each key).
    pointer_piece_keys: str = "covering"
    # Continuation: where the token match holds, add this times the attention the previous position gave
    # the slot each slot continues (the passage token before it; for an answer piece, the piece or first
    # token before it), so a copy stays on the occurrence it started on. 0 = off. Needs pointer_match.
    pointer_continue_bonus: float = 0.0
    # Stop slots: with a reader that has an end head, each passage token where the reader puts at least
    # 2 % of its answer-end mass gets one more pointer slot, matched like the slot after that token
    # but writing the end-of-answer token, with reader_end_weight * log(p_end / (1 - p_end)) added to
    # its score, reachable only right after that token (and, with the bigram bonus, the one before
    # it) was written: so after copying the answer's last token the copy stops there. 0 = off.
    reader_end_weight: float = 0.0
    # Whitened values: the pointer writes, instead of a token's output-embedding row, the direction
    # that raises that token's logit alone through the decoder's final norm and output layer
    # (diekae_rag.encoder.whitened_values), scaled to give the token the same logit boost. A raw
    # row also raises its look-alikes, often more than the token itself (" Sask" -> " tempfile").
    pointer_whitened_values: bool = False
    # Question-aware encoding: the encoder reads x + K + x instead of K + x.
    question_first: bool = False
    # Passage isolation: each passage is encoded on its own (cacheable per passage); only the
    # suffix + prompt run through the encoders at query time.
    passage_isolation: bool = False
    # Edit encoders only: rows go only to prompts that name one of these subjects (whole words,
    # any case); empty = every prompt.
    edit_scope: list[str] = field(default_factory=list)
    # Edit encoders in fact scope: each subject's edit prompts with "{s}" for the subject; a prompt
    # naming the subject must also be worded nearest to one of these (diekae_rag.edit_scope).
    edit_templates: dict[str, list[str]] = field(default_factory=dict)
    system_prompt: str = "Answer the question in a few words."
    rope_theta: float = 10000.0
    format_version: int = FORMAT_VERSION

    @property
    def n_injection(self) -> int:
        return len(self.layers)

    @property
    def n_trunks(self) -> int:
        """Encoder trunks: one per injected layer, plus one for the pointer readout."""
        return len(self.layers) + (1 if self.pointer_layer is not None else 0)

    @property
    def can_use_passage_prior(self) -> bool:
        """The passage prior biases the pointer over isolated passages: it needs both."""
        return self.pointer_layer is not None and self.passage_isolation

    @property
    def hooked_layers(self) -> list[int]:
        extra = [] if self.pointer_layer is None else [self.pointer_layer]
        return sorted(set(self.layers) | set(extra))

    def validate(self, num_decoder_layers: Optional[int] = None) -> None:
        """Raise ValueError with a fix for any inconsistent setting."""
        if not self.layers and self.pointer_layer is None:
            raise ValueError("DiekaeConfig needs at least one injection layer or a pointer_layer.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"Duplicate layers in {self.layers}; list each decoder layer once.")
        if self.d_enc % self.n_heads or (self.d_enc // self.n_heads) % 2:
            raise ValueError(f"d_enc={self.d_enc} must split into n_heads={self.n_heads} even-sized heads.")
        if self.pointer_match and self.pointer_layer is None:
            raise ValueError("pointer_match needs a pointer readout: set pointer_layer too.")
        if self.pointer_bigram_bonus and not self.pointer_match:
            raise ValueError("pointer_bigram_bonus extends the token match: set pointer_match=True too, "
                             "or pointer_bigram_bonus=0.")
        if self.pointer_first_scorer and self.pointer_layer is None:
            raise ValueError("pointer_first_scorer scores the pointer's first copy: set pointer_layer too, "
                             "or pointer_first_scorer=0.")
        if self.pointer_first_scorer < 0:
            raise ValueError(f"pointer_first_scorer is a hidden width (0 = off), got {self.pointer_first_scorer!r}.")
        for name in ("pointer_sharpness", "pointer_first_gain"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        if self.passage_prior < 0 or self.passage_prior != self.passage_prior:
            raise ValueError(f"passage_prior must be 0 (off) or a positive strength, got {self.passage_prior!r}.")
        if self.passage_prior and not self.can_use_passage_prior:
            raise ValueError("passage_prior biases the pointer readout of isolated passages: set pointer_layer "
                             "and passage_isolation=True, or passage_prior=0.")
        if self.reader_weight < 0 or self.reader_weight != self.reader_weight:
            raise ValueError(f"reader_weight must be 0 (off) or a positive weight, got {self.reader_weight!r}.")
        if self.reader_weight and not self.can_use_passage_prior:
            raise ValueError("reader_weight biases the pointer readout of isolated passages: set pointer_layer "
                             "and passage_isolation=True, or reader_weight=0.")
        if self.reader_end_weight < 0 or self.reader_end_weight != self.reader_end_weight:
            raise ValueError(f"reader_end_weight must be 0 (off) or a positive weight, got {self.reader_end_weight!r}.")
        if self.reader_end_weight and not (self.pointer_match and self.can_use_passage_prior):
            raise ValueError("reader_end_weight adds stop slots to the token match over isolated passages: set "
                             "pointer_match=True, pointer_layer and passage_isolation=True, or reader_end_weight=0.")
        if self.pointer_answer_pieces and not (self.pointer_match and self.can_use_passage_prior):
            raise ValueError("pointer_answer_pieces continues the token match over isolated passages: set "
                             "pointer_match=True, pointer_layer and passage_isolation=True, or pointer_answer_pieces=False.")
        if self.pointer_continue_bonus and not self.pointer_match:
            raise ValueError("pointer_continue_bonus acts where the token match holds: set pointer_match=True "
                             "or pointer_continue_bonus=0.")
        if self.pointer_piece_keys not in PIECE_KEYS:
            raise ValueError(f"pointer_piece_keys={self.pointer_piece_keys!r}: use one of {', '.join(PIECE_KEYS)}.")
        if self.passage_isolation and self.question_first:
            raise ValueError("passage_isolation and question_first cannot be combined.")
        if num_decoder_layers is not None:
            bad = [l for l in self.hooked_layers if not 0 <= l < num_decoder_layers]
            if bad:
                raise ValueError(f"Layers {bad} do not exist: the decoder has {num_decoder_layers} layers "
                                 f"(valid: 0..{num_decoder_layers - 1}).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiekaeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown DiekaeConfig keys {unknown}; this checkpoint needs a newer diekae-rag.")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"Checkpoint format {data['format_version']} is newer than supported "
                             f"({FORMAT_VERSION}); upgrade diekae-rag.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DiekaeConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cannot read encoder config {path}: {exc}. Re-save the checkpoint.") from exc
        if not isinstance(data, dict):
            raise ValueError(f"Encoder config {path} is not a JSON object. Re-save the checkpoint.")
        return cls.from_dict(data)
