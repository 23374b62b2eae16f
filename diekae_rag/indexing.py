"""Index-time work: passage states computed ahead of queries, kept in memory or on disk, and a
server's warm-up, so that a query encodes only its question."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch

from .copy import GATE_OFF
from .state_store import PassageStateStore

if TYPE_CHECKING:
    from .model import DiekaeModel


def _isolated(model: "DiekaeModel", what: str) -> None:
    if not model.config.passage_isolation:
        raise ValueError(f"{what} need(s) encoders trained with passage_isolation=True.")


def precompute(model: "DiekaeModel", passages: Sequence[Any], copy: Optional[Mapping] = None) -> int:
    """Encode passages ahead of queries (e.g. at index time) so that queries only encode the prompt.
    Needs ``passage_isolation``; returns how many passages are now cached in memory."""
    _isolated(model, "precompute()")
    return model.knowledge.precompute(passages, model.copy.with_overrides(copy))


def index_states(model: "DiekaeModel", passages: Sequence[Any], folder: Union[str, Path],
                 dtype: Optional[str] = None, progress: bool = True, vectors: Optional[dict] = None
                 ) -> PassageStateStore:
    """Compute the passages' encoder states once (those not stored yet), keep them on disk in
    ``folder`` and attach them to ``model``: its queries then read a passage's states instead of
    encoding it. ``dtype``: ``"int4"`` (the default for a new folder), ``"float16"``, ``"float32"`` or
    ``"int8"`` (:data:`~diekae_rag.state_store.DTYPES`).
    ``vectors``: {text: unit vector} already computed by the passage prior's embedder (e.g. the FAISS
    store's, when it uses the same model), so those passages are not embedded again."""
    _isolated(model, "Stored passage states")
    store = PassageStateStore(folder, model.encoder, dtype=dtype)
    model.knowledge.store_states(passages, store, model.copy, progress=progress, vectors=vectors)
    model.knowledge.attach_store(store, model.encoder)
    return store


def attach_states(model: "DiekaeModel", folder: Union[str, Path]) -> PassageStateStore:
    """Read passage states from ``folder`` (written by :func:`index_states`), which must hold states of
    ``model``'s encoder weights; passages not stored there are encoded on first use."""
    store = PassageStateStore(folder, model.encoder, create=False)
    model.knowledge.attach_store(store, model.encoder)
    return store


def warm_up(model: "DiekaeModel", k: int = 5) -> "DiekaeModel":
    """Load what the first call would load (the answer-start reader, the passage prior's embedder) and
    run one call over ``k`` invented passages of a retrieved chunk's usual length, so that a server's
    first query is about as fast as later ones: the code paths and kernels a real query takes are made
    here, not in it."""
    from .data.fictional import make_facts
    facts = make_facts(max(k, 1), seed=101, relations="all", other_facts=(8, 8))  # no benchmark uses seed 101
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(facts[0].question, [f.passage for f in facts], max_new_tokens=1,
                       copy=GATE_OFF)  # so the encoders' path runs too
    return model
