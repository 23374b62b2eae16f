"""The FAISS passage store: index + chunk texts + metadata, persisted without pickle.

On disk (format version 1), in one folder:

    manifest.json            {"format", "generation", files and their sha256, settings}
    chunks-<gen>.json        chunk texts and metadata, in FAISS id order
    embeddings-<gen>.npy     float32 vectors (np.save, allow_pickle=False)
    index-<gen>.faiss        the FAISS index built from them

A save writes a new generation's files (temp file, fsync, rename), then atomically replaces
``manifest.json``, then removes the old generation. A crash at any point leaves the previous
manifest pointing at complete files. Writers take an exclusive lock; readers verify checksums.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from diekae_rag.atomic import atomic_write, atomic_write_bytes, atomic_write_text

from .chunking import chunk_document
from .documents import Document, load_documents
from .embeddings import Embedder

FORMAT = "diekae-rag-store/1"
INDEX_TYPES = ("flat", "hnsw", "ivf")


class StoreError(ValueError):
    """A store on disk is missing, corrupt or incompatible; the message names the file."""


@dataclass
class Passage:
    text: str
    score: float
    doc_id: str
    chunk_index: int
    metadata: dict = field(default_factory=dict)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_index(vectors: np.ndarray, index_type: str = "flat", hnsw_m: int = 32, ivf_lists: Optional[int] = None
                ) -> faiss.Index:
    """An inner-product FAISS index over unit vectors (= cosine similarity)."""
    n, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
    elif index_type == "ivf":
        nlist = ivf_lists or max(1, int(4 * np.sqrt(max(n, 1))))
        if n < nlist:
            index = faiss.IndexFlatIP(dim)  # too few vectors to train IVF: exact search
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(16, nlist)
    else:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
    if n:
        index.add(vectors)
    return index


class PassageStore:
    """Chunks of documents, their embeddings and a FAISS index; ``search`` returns passages."""

    def __init__(self, embedder: Optional[Embedder] = None, index_type: str = "flat",
                 chunk_tokens: int = 120, overlap: int = 20) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
        self.embedder = embedder or Embedder()
        self.index_type = index_type
        self.chunk_tokens, self.overlap = chunk_tokens, overlap
        self.chunks: list[dict] = []                  # {"doc_id", "chunk_index", "text", "metadata"}
        self.doc_hashes: dict[str, str] = {}
        self.vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        self._index: Optional[faiss.Index] = None
        self.generation = 0

    # ---------------------------------------------------------------- building
    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def index(self) -> faiss.Index:
        if self._index is None:
            self._index = build_index(self.vectors, self.index_type)
        return self._index

    def add_documents(self, docs: Iterable[Document], progress: bool = True) -> dict[str, int]:
        """Add new documents; a changed document's chunks are replaced, an unchanged one is skipped."""
        added, replaced, unchanged = 0, 0, 0
        new_chunks, texts = [], []
        docs = list(docs)
        for doc in docs:
            sha = doc.sha256
            if self.doc_hashes.get(doc.doc_id) == sha:
                unchanged += 1
                continue
            if doc.doc_id in self.doc_hashes:
                self.delete(doc.doc_id)
                replaced += 1
            else:
                added += 1
            for c in chunk_document(doc, self.embedder.tokenizer, self.chunk_tokens, self.overlap):
                new_chunks.append({"doc_id": doc.doc_id, "chunk_index": c.index, "text": c.text,
                                   "metadata": {**doc.metadata, "start": c.start, "end": c.end}})
                texts.append(c.text)
            self.doc_hashes[doc.doc_id] = sha
        if texts:
            vecs = []
            bs = self.embedder.batch_size
            for i in tqdm(range(0, len(texts), bs), desc="embedding chunks", disable=not progress):
                vecs.append(self.embedder.encode(texts[i: i + bs]))
            self.add_vectors(np.concatenate(vecs), new_chunks)
        return {"added": added, "replaced": replaced, "unchanged": unchanged, "chunks": len(self.chunks)}

    def add_vectors(self, vectors: np.ndarray, chunks: Sequence[dict]) -> None:
        """Append precomputed unit vectors with their chunk records."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embedder.dim or len(vectors) != len(chunks):
            raise ValueError(f"Expected {len(chunks)} vectors of dim {self.embedder.dim}, got {vectors.shape}.")
        self.vectors = np.concatenate([self.vectors, vectors])
        self.chunks.extend(chunks)
        if self._index is not None and self.index_type != "ivf":
            self._index.add(vectors)
        else:
            self._index = None

    def delete(self, doc_id: str) -> int:
        """Remove a document's chunks; returns how many were removed."""
        keep = [i for i, c in enumerate(self.chunks) if c["doc_id"] != doc_id]
        removed = len(self.chunks) - len(keep)
        if removed:
            self.chunks = [self.chunks[i] for i in keep]
            self.vectors = self.vectors[keep]
            self._index = None
        self.doc_hashes.pop(doc_id, None)
        return removed

    def sync_folder(self, folder: str | Path, follow_symlinks: bool = False, progress: bool = True) -> dict[str, int]:
        """Make the store match ``folder``: add new files, re-index changed ones, drop deleted ones."""
        docs = load_documents(folder, follow_symlinks=follow_symlinks)
        present = {d.doc_id for d in docs}
        deleted = [d for d in list(self.doc_hashes) if d not in present]
        for d in deleted:
            self.delete(d)
        stats = self.add_documents(docs, progress=progress)
        stats["deleted"] = len(deleted)
        return stats

    # ---------------------------------------------------------------- search
    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The ``k`` chunks most similar to ``query``, best first."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("The search query is empty.")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        if not self.chunks:
            return []
        return self.search_vectors(self.embedder.encode_queries([query]), k)[0]

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Passage]]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.chunks)))
        out = []
        for row_s, row_i in zip(scores, ids):
            out.append([Passage(self.chunks[i]["text"], float(s), self.chunks[i]["doc_id"],
                                self.chunks[i]["chunk_index"], dict(self.chunks[i]["metadata"]))
                        for s, i in zip(row_s, row_i) if i >= 0])
        return out

    # ---------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        """Write a new generation atomically (see the module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder):
            old = _read_manifest(folder) if (folder / "manifest.json").exists() else None
            gen = max(self.generation, old["generation"] if old else 0) + 1
            names = {"chunks": f"chunks-{gen}.json", "embeddings": f"embeddings-{gen}.npy",
                     "index": f"index-{gen}.faiss"}
            atomic_write_text(folder / names["chunks"], json.dumps(
                {"chunks": self.chunks, "doc_hashes": self.doc_hashes}, ensure_ascii=False))
            buf = io.BytesIO()
            np.save(buf, self.vectors, allow_pickle=False)
            atomic_write_bytes(folder / names["embeddings"], buf.getvalue())
            atomic_write(folder / names["index"], lambda tmp: faiss.write_index(self.index, str(tmp)))
            manifest = {"format": FORMAT, "generation": gen, "files": names,
                        "sha256": {k: _sha(folder / v) for k, v in names.items()},
                        "count": len(self.chunks), "dim": self.embedder.dim, "embedder": Path(self.embedder.name).name,
                        "index_type": self.index_type, "chunk_tokens": self.chunk_tokens, "overlap": self.overlap}
            atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
            self.generation = gen
            for f in folder.iterdir():  # the previous generations are no longer referenced
                if f.name.split("-")[0] in ("chunks", "embeddings", "index") and f.name not in names.values():
                    f.unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, embedder: Optional[Embedder] = None, retries: int = 3) -> "PassageStore":
        """Load a saved store, verifying every file; raises :class:`StoreError` naming a bad file."""
        folder = Path(folder)
        for attempt in range(retries):
            try:
                return cls._load_once(folder, embedder)
            except _Raced:
                time.sleep(0.05 * (attempt + 1))  # a writer replaced the generation under us
        raise StoreError(f"{folder} kept changing while loading (another process is writing); try again.")

    @classmethod
    def _load_once(cls, folder: Path, embedder: Optional[Embedder]) -> "PassageStore":
        m = _read_manifest(folder)
        try:
            return cls._load_generation(folder, m, embedder)
        except (StoreError, OSError) as exc:
            # a file vanished or changed between reading the manifest and reading it: a writer's new
            # generation, if the manifest moved on meanwhile
            if _read_manifest(folder)["generation"] != m["generation"]:
                raise _Raced() from exc
            if isinstance(exc, FileNotFoundError):
                raise StoreError(f"{exc.filename} is missing (the store at {folder} is incomplete). Rebuild it.") from exc
            if isinstance(exc, OSError):
                raise StoreError(f"Cannot read the store at {folder}: {exc}. Rebuild it.") from exc
            raise

    @classmethod
    def _load_generation(cls, folder: Path, m: dict, embedder: Optional[Embedder]) -> "PassageStore":
        paths = {k: folder / v for k, v in m["files"].items()}
        for k, p in paths.items():
            if _sha(p) != m["sha256"][k]:
                raise StoreError(f"{p} is corrupt or truncated (checksum mismatch). Rebuild the store.")
        try:
            data = json.loads(paths["chunks"].read_text(encoding="utf-8"))
            vectors = np.load(paths["embeddings"], allow_pickle=False)
            index = faiss.read_index(str(paths["index"]))
        except (ValueError, OSError, RuntimeError) as exc:
            raise StoreError(f"Cannot read the store at {folder}: {exc}. Rebuild it.") from exc
        store = cls(embedder, m["index_type"], m["chunk_tokens"], m["overlap"])
        if store.embedder.dim != m["dim"]:
            raise StoreError(f"{folder / 'manifest.json'}: the store was built with {m['embedder']} "
                             f"(dim {m['dim']}), not with this embedder (dim {store.embedder.dim}).")
        if len(data["chunks"]) != m["count"] or vectors.shape != (m["count"], m["dim"]) or index.ntotal != m["count"]:
            raise StoreError(f"{folder}: files disagree on the number of chunks. Rebuild the store.")
        store.chunks, store.doc_hashes, store.vectors = data["chunks"], data["doc_hashes"], vectors
        store._index, store.generation = index, m["generation"]
        return store


class _Raced(Exception):
    pass


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise StoreError(f"No store at {folder}: {path} is missing. Build one with PassageStore().sync_folder(...).save(...).")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is corrupt ({exc}). Rebuild the store.") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} manifest (got {m.get('format') if isinstance(m, dict) else m!r}).")
    return m


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_or_build(folder: str | Path, store_dir: str | Path, embedder: Optional[Embedder] = None,
                  progress: bool = True, model=None, states_dtype: Optional[str] = None, **kwargs) -> PassageStore:
    """Load the store at ``store_dir`` (if any), sync it with ``folder`` and save it if anything changed.

    With a ``model`` (a :class:`~diekae_rag.DiekaeModel`), every chunk's encoder states are computed
    once and kept in ``store_dir/states`` (only chunks not stored yet are encoded), and the model
    reads them at query time instead of encoding the retrieved chunks."""
    store_dir = Path(store_dir)
    store = PassageStore.load(store_dir, embedder) if (store_dir / "manifest.json").exists() \
        else PassageStore(embedder, **kwargs)
    stats = store.sync_folder(folder, progress=progress)
    if stats["added"] or stats["replaced"] or stats["deleted"] or not (store_dir / "manifest.json").exists():
        store.save(store_dir)
    if model is not None:
        from diekae_rag.copy import PassagePrior
        from diekae_rag.state_store import states_folder
        texts = [c["text"] for c in store.chunks]
        prior = model.passage_prior
        same = isinstance(prior, PassagePrior) and getattr(prior.embedder, "name", None) == store.embedder.name
        from diekae_rag.indexing import index_states
        index_states(model, texts, states_folder(store_dir), dtype=states_dtype, progress=progress,
                           vectors=dict(zip(texts, store.vectors)) if same else None)  # embedded once, not twice
    return store


__all__ = ["Passage", "PassageStore", "StoreError", "build_index", "open_or_build"]
