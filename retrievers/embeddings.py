"""Embeddings: sentence-transformers, batched and L2-normalised (default: all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import numpy as np

_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}


class Embedder:
    """A sentence-transformers model loaded once per process per path."""

    def __init__(self, model_path: Optional[str] = None, batch_size: int = 64, device: str = "cpu") -> None:
        from diekae_rag.defaults import default_embedder_path
        self.name = str(model_path or default_embedder_path())
        self.batch_size = batch_size
        with _LOCK:
            if self.name not in _CACHE:
                from sentence_transformers import SentenceTransformer
                _CACHE[self.name] = SentenceTransformer(self.name, device=device)
        self.model = _CACHE[self.name]
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # tokenizers are not thread-safe under concurrent encode
            vec = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vec, dtype=np.float32)
