"""EncoderConfig: what a set of DIEKÆ encoders' weights need (shape, layers, prompt template).

It is pinned to the weights (stored in the safetensors metadata and in ``config.json``). The copy
readout's serving-time settings live apart, in :class:`diekae_rag.copy.CopyConfig` (``copy.json``).
Checkpoints of format 1 held both in one config; :func:`migrate` splits them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .copy.config import FIELDS as COPY_FIELDS
from .copy.config import FORMAT1_NAMES, CopyConfig

FORMAT_VERSION = 2

# Settings that were measured, not shipped, and removed (docs/decisions.md); an old checkpoint
# may carry them only at the value that switched them off.
RETIRED = {
    "pointer_first_scorer": (0, "the first-token scorer was removed"),
    "reader_end_weight": (0.0, "the reader's stop slots were removed"),
    "question_first": (False, "question-first encoding was removed"),
}


def decoder_fingerprint(decoder_config: Any) -> str:
    """A short hash of the decoder properties the encoders depend on (shape and vocabulary)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    src = decoder_config.to_dict() if hasattr(decoder_config, "to_dict") else dict(decoder_config)
    blob = json.dumps({k: src.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_setting(spec: str) -> tuple[str, str]:
    """``"FIELD=TEXT"`` -> ``(field, text)``, checking that FIELD is a CopyConfig setting."""
    name, sep, text = spec.partition("=")
    if not sep or name not in COPY_FIELDS:
        raise ValueError(f"{spec!r}: write FIELD=VALUE with a copy setting ({', '.join(COPY_FIELDS)}).")
    return name, text


def parse_settings(specs: Sequence[str]) -> dict[str, Any]:
    """``["FIELD=JSON", ...]`` -> ``{field: value}`` for copy settings given on a command line
    (e.g. ``continue_bonus=0`` or ``first_unspaced=false``)."""
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
class EncoderConfig:
    """Shape of one set of DIEKÆ encoders attached to one decoder, and the template they read.

    The default is the paper's form: encoders for layers 3-8 whose rows are added to the MLP
    outputs at the question's positions only (``per_step=False``, no pointer). ``configs/shipped.json``
    holds the shipped form.
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
    # Copy readout (diekae_rag.copy): a copy-attention over knowledge tokens into this layer's MLP output.
    pointer_layer: Optional[int] = None
    pointer_heads: int = 1
    pointer_key_dim: int = 64
    # Token match: a learned bonus (times this scale) on copy scores where the knowledge token before
    # a slot equals the query's own token (an explicit induction prior).
    pointer_match: bool = False
    pointer_match_scale: float = 100.0
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
        """Encoder trunks: one per injected layer, plus one for the copy readout."""
        return len(self.layers) + (1 if self.pointer_layer is not None else 0)

    @property
    def hooked_layers(self) -> list[int]:
        extra = [] if self.pointer_layer is None else [self.pointer_layer]
        return sorted(set(self.layers) | set(extra))

    def validate(self, num_decoder_layers: Optional[int] = None) -> None:
        """Raise ValueError with a fix for any inconsistent setting."""
        if not self.layers and self.pointer_layer is None:
            raise ValueError("EncoderConfig needs at least one injection layer or a pointer_layer.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"Duplicate layers in {self.layers}; list each decoder layer once.")
        if self.d_enc % self.n_heads or (self.d_enc // self.n_heads) % 2:
            raise ValueError(f"d_enc={self.d_enc} must split into n_heads={self.n_heads} even-sized heads.")
        if self.pointer_match and self.pointer_layer is None:
            raise ValueError("pointer_match needs a copy readout: set pointer_layer too.")
        if num_decoder_layers is not None:
            bad = [l for l in self.hooked_layers if not 0 <= l < num_decoder_layers]
            if bad:
                raise ValueError(f"Layers {bad} do not exist: the decoder has {num_decoder_layers} layers "
                                 f"(valid: 0..{num_decoder_layers - 1}).")

    def for_decoder(self, decoder_config: Any, name: str) -> "EncoderConfig":
        """A copy with the decoder-dependent fields filled from ``decoder_config`` (layers beyond the
        decoder's are dropped, a pointer layer beyond it moves to its last layer)."""
        c = EncoderConfig.from_dict(self.to_dict())
        c.decoder_name, c.decoder_fingerprint = name, decoder_fingerprint(decoder_config)
        c.hidden_size, c.vocab_size = decoder_config.hidden_size, decoder_config.vocab_size
        n = decoder_config.num_hidden_layers
        c.layers = [l for l in c.layers if l < n] or [min(1, n - 1)]
        if c.pointer_layer is not None and c.pointer_layer >= n:
            c.pointer_layer = n - 1
        c.validate(n)
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        """From a config of any format (format 1's serving settings are dropped: see :func:`migrate`)."""
        return migrate(data)[0]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "EncoderConfig":
        return migrate(read_json(path))[0]


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read encoder config {path}: {exc}. Re-save the checkpoint.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"Encoder config {path} is not a JSON object. Re-save the checkpoint.")
    return data


def migrate(data: dict[str, Any]) -> tuple[EncoderConfig, Optional[CopyConfig]]:
    """An encoder config of format 1 or 2 -> (EncoderConfig, its copy settings or None).

    Format 1 kept the copy settings in the encoder config, under other names; they become a
    CopyConfig (their format-1 defaults were the settings' off values). A retired key is accepted
    only at its off value; otherwise the error says what changed.
    """
    data = dict(data)
    version = data.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"Checkpoint format {version} is newer than supported ({FORMAT_VERSION}); "
                         "upgrade diekae-rag.")
    copy = None
    if version < 2:
        for key, (off, what) in RETIRED.items():
            if key in data and data.pop(key) != off:
                raise ValueError(f"This checkpoint sets {key}, but {what} (docs/decisions.md): it cannot be "
                                 "loaded as it was trained. Use a checkpoint without it.")
        keys_mode = data.pop("pointer_piece_keys", "both")
        plain = CopyConfig.plain().to_dict()
        copy_values = {new: data.pop(old, plain[new]) for old, new in FORMAT1_NAMES.items()}
        if copy_values["answer_pieces"] and keys_mode != "both":
            raise ValueError(f"This checkpoint gives answer pieces the {keys_mode!r} key; only the two keys of "
                             "'both' remain (docs/decisions.md). Set pointer_piece_keys to \"both\" in its "
                             "config, or pointer_answer_pieces to false.")
        copy = CopyConfig.from_dict({**plain, **copy_values})  # no gate: format 1 had none
        data["format_version"] = FORMAT_VERSION
    known = {f.name for f in dataclasses.fields(EncoderConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown encoder config keys {unknown}; copy settings belong in copy.json "
                         f"({', '.join(COPY_FIELDS)}), or this checkpoint needs a newer diekae-rag.")
    return EncoderConfig(**data), copy
