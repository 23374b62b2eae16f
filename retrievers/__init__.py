"""Retrieval: documents -> chunks -> embeddings -> FAISS store -> passages."""

from .chunking import Chunk, chunk_document
from .documents import Document, SkippedFilesWarning, load_documents
from .embeddings import Embedder
from .store import Passage, PassageStore, StoreError, open_or_build

__all__ = ["Chunk", "Document", "Embedder", "Passage", "PassageStore", "SkippedFilesWarning", "StoreError",
           "chunk_document", "load_documents", "open_or_build"]
