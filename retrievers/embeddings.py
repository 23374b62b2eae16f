"""Embeddings: sentence-transformers, batched and L2-normalised (default: all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import numpy as np

from diekae_rag.lru import LRU

_LOCK = threading.Lock()
_CACHE: dict[str, object] = {}
_QUERIES: dict[str, LRU] = {}  # per model: the last questions embedded, text -> unit vector


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
            self._queries = _QUERIES.setdefault(self.name, LRU(256))
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

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`encode` for questions, keeping the last 256 per model: a question the retriever
        has embedded is not embedded again by the passage prior or the gate."""
        found = self._queries.get_many(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in found))
        if todo:
            new = self.encode(todo)
            found.update(zip(todo, new))
            self._queries.put_many(zip(todo, new))
        return np.stack([found[t] for t in texts]) if len(texts) else self.encode([])

    def forget_queries(self) -> None:
        """Forget the kept question vectors (of every Embedder of this model)."""
        self._queries.clear()
