"""What the framework integrations share: one default model per process."""

from __future__ import annotations

import threading
from typing import Optional

from diekae_rag.defaults import DEFAULT_DECODER
from diekae_rag.model import DiekaeModel

_DEFAULT: list[DiekaeModel] = []
_LOCK = threading.Lock()


def default_model() -> DiekaeModel:
    """The default DiekaeModel (embedded decoder + shipped encoders), loaded once and shared."""
    with _LOCK:
        if not _DEFAULT:
            _DEFAULT.append(DiekaeModel.from_pretrained())
        return _DEFAULT[0]


def model_name(model: Optional[DiekaeModel]) -> str:
    """The name frameworks report for a model: ``diekae:`` and its decoder (the default's when unset)."""
    return "diekae:" + (model.config.decoder_name if model is not None else DEFAULT_DECODER)


def copy_overrides(copy: Optional[dict], on_no_answer: Optional[str]) -> Optional[dict]:
    """A component's copy settings for each call: its ``copy`` dict, with ``on_no_answer`` when set."""
    out = dict(copy or {})
    if on_no_answer is not None:
        out["on_no_answer"] = on_no_answer
    return out or None
