"""Retrieval with the real MiniLM and a real FAISS index."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from diekae_rag.retrievers import (Document, PassageStore, SkippedFilesWarning, StoreError, chunk_document,
                                   load_documents, open_or_build)

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"


@pytest.fixture
def docs_copy(tmp_path):
    dst = tmp_path / "docs"
    shutil.copytree(DOCS, dst)
    return dst


def test_chunks_are_token_windows_with_overlap(real_embedder):
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunk_document(Document("d", text), real_embedder.tokenizer, chunk_tokens=50, overlap=10)
    assert len(chunks) > 3
    tok = real_embedder.tokenizer
    for a, b in zip(chunks, chunks[1:]):
        assert a.end > b.start, "consecutive chunks overlap"
        assert len(tok(a.text, add_special_tokens=False)["input_ids"]) <= 50 + 5
    assert chunks[0].text.startswith("word0") and chunks[-1].text.endswith("word399")
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(Document("d", text), tok, chunk_tokens=50, overlap=50)


def test_retrieval_finds_the_right_document(real_embedder):
    store = PassageStore(real_embedder)
    store.sync_folder(DOCS, progress=False)
    cases = {"Who is Marsul married to?": "marsul_vantrel.md",
             "When was Calgra founded?": "calgra.md",
             "Who leads the Pelgrin Observatory?": "pelgrin_observatory.md",
             "How long does the Zorvian tea ceremony last?": "zorvian_tea.md",
             "How fast is the Silver Kestrel engine?": "thornvale_railway.md"}
    for q, doc in cases.items():
        hits = store.search(q, 3)
        assert hits[0].doc_id == doc, (q, [h.doc_id for h in hits])
        assert hits[0].score >= hits[-1].score


def test_the_passage_prior_reuses_the_question_vector_the_retriever_made(real_embedder, monkeypatch):
    from diekae_rag.copy import PassagePrior
    store = PassageStore(real_embedder)
    store.sync_folder(DOCS, progress=False)
    q = "Who leads the Pelgrin Observatory?"
    real_embedder.forget_queries()
    hits = [h.text for h in store.search(q, 3)]
    prior = PassagePrior(embedder=type(real_embedder)())  # another Embedder of the same model
    encoded = []
    real_encode = type(real_embedder).encode
    monkeypatch.setattr(type(real_embedder), "encode", lambda self, texts, progress=False: (
        encoded.extend(texts), real_encode(self, texts, progress))[1])
    cos = prior.cosines([q], [hits])[0]
    assert q not in encoded and sorted(encoded) == sorted(set(hits)), "only the passages are embedded"
    assert np.allclose(cos, [h.score for h in store.search(q, 3)], atol=1e-5)
    prior.embedder.forget_queries()
    prior.clear()
    prior.cosines([q], [hits])
    assert encoded.count(q) == 1, "a forgotten question is embedded again"


def test_persistence_round_trip(tmp_path, real_embedder):
    store = PassageStore(real_embedder)
    store.sync_folder(DOCS, progress=False)
    store.save(tmp_path / "s")
    again = PassageStore.load(tmp_path / "s", real_embedder)
    q = "What dish is Calgra famous for?"
    assert [(p.doc_id, p.chunk_index, p.text) for p in again.search(q, 4)] == \
           [(p.doc_id, p.chunk_index, p.text) for p in store.search(q, 4)]
    assert again.doc_hashes == store.doc_hashes
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "s").iterdir())


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_other_index_types(tmp_path, real_embedder, index_type):
    store = PassageStore(real_embedder, index_type=index_type)
    store.sync_folder(DOCS, progress=False)
    store.save(tmp_path / "s")
    again = PassageStore.load(tmp_path / "s", real_embedder)
    assert again.index_type == index_type
    assert again.search("Who founded Calgra?", 1)[0].doc_id == "calgra.md"


def test_delete_and_reindex_changed_file(docs_copy, tmp_path, real_embedder):
    store = open_or_build(docs_copy, tmp_path / "s", real_embedder, progress=False)
    n_before = len(store)
    (docs_copy / "calgra.md").write_text("Calgra is a town whose mayor is Pellow Stravinth.", encoding="utf-8")
    (docs_copy / "zorvian_tea.md").unlink()
    store = open_or_build(docs_copy, tmp_path / "s", real_embedder, progress=False)
    assert "zorvian_tea.md" not in {c["doc_id"] for c in store.chunks}
    calgra = [c["text"] for c in store.chunks if c["doc_id"] == "calgra.md"]
    assert calgra == ["Calgra is a town whose mayor is Pellow Stravinth."]
    assert len(store) < n_before
    assert store.search("Who is the mayor of Calgra?", 1)[0].text.startswith("Calgra is a town")
    reloaded = PassageStore.load(tmp_path / "s", real_embedder)
    assert len(reloaded) == len(store)
    assert store.delete("calgra.md") == 1 and store.delete("calgra.md") == 0


def test_messy_folder_skips_binary_and_foreign_symlinks(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.md").write_text("Fine text.", encoding="utf-8")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (folder / "image.png").write_bytes(b"\x89PNG")
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the folder", encoding="utf-8")
    (folder / "link.txt").symlink_to(outside)
    with pytest.warns(SkippedFilesWarning) as rec:
        docs = load_documents(folder)
    assert [d.doc_id for d in docs] == ["good.md"]
    assert len(rec) == 1
    msg = str(rec[0].message)
    for name in ("latin1.txt", "blob.txt", "image.png", "link.txt"):
        assert name in msg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "link.txt" in [d.doc_id for d in load_documents(folder, follow_symlinks=True)]


def test_search_rejects_bad_queries(real_embedder):
    store = PassageStore(real_embedder)
    assert store.search("anything", 3) == []
    with pytest.raises(ValueError, match="empty"):
        store.search("   ", 3)
    with pytest.raises(ValueError, match="k must"):
        store.search("x", 0)


def test_corrupt_store_names_the_file(tmp_path, real_embedder):
    store = PassageStore(real_embedder)
    store.add_vectors(np.eye(3, real_embedder.dim, dtype=np.float32),
                      [{"doc_id": f"d{i}", "chunk_index": 0, "text": f"t{i}", "metadata": {}} for i in range(3)])
    store.save(tmp_path / "s")
    index_file = next((tmp_path / "s").glob("index-*.faiss"))
    data = index_file.read_bytes()
    index_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=index_file.name):
        PassageStore.load(tmp_path / "s", real_embedder)
    (tmp_path / "s" / "manifest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StoreError, match="manifest.json"):
        PassageStore.load(tmp_path / "s", real_embedder)
    with pytest.raises(StoreError, match="missing"):
        PassageStore.load(tmp_path / "nowhere", real_embedder)


def test_load_retries_when_a_writer_removes_a_file_between_the_manifest_and_its_read(tmp_path, monkeypatch,
                                                                                    real_embedder):
    import diekae_rag.retrievers.store as store_module
    store = PassageStore(real_embedder)
    store.add_vectors(np.eye(3, real_embedder.dim, dtype=np.float32),
                      [{"doc_id": f"d{i}", "chunk_index": 0, "text": f"t{i}", "metadata": {}} for i in range(3)])
    store.save(tmp_path / "s")
    real_sha, calls = store_module._sha, []

    def sha_racing_a_writer(path):
        calls.append(path)
        if len(calls) == 1:  # a writer saves the next generation and deletes this file, after it passed exists()
            store.save(tmp_path / "s")
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_sha(path)
    monkeypatch.setattr(store_module, "_sha", sha_racing_a_writer)
    loaded = PassageStore.load(tmp_path / "s", real_embedder)
    assert loaded.generation == store.generation and len(loaded) == 3
    monkeypatch.setattr(store_module, "_sha", lambda path: (_ for _ in ()).throw(
        FileNotFoundError(2, "No such file or directory", str(path))))
    with pytest.raises(StoreError, match="missing"):  # no writer: the store really is incomplete
        PassageStore.load(tmp_path / "s", real_embedder)


def test_retrieved_distractors_are_the_questions_nearest_passages(tmp_path, monkeypatch, real_embedder):
    from diekae_rag.data.distractors import retrieved_distractors
    from diekae_rag.data.fictional import make_facts
    from diekae_rag.data.mixture import retrieval_style

    facts = make_facts(40, seed=3)
    pool = sorted({f.passage for f in facts})
    questions, golds = [f.question for f in facts], [f.passage for f in facts]
    mined = retrieved_distractors(questions, golds, pool, 3, cache=tmp_path)
    assert all(len(m) == 3 and g not in m for m, g in zip(mined, golds)), "gold passage never a distractor"
    # the question's nearest non-gold passages: most share its relation (same template words)
    same = sum(any(o.relation == f.relation for o in facts if o.passage == m[0]) for f, m in zip(facts, mined))
    assert same >= 25, same
    cached = list(tmp_path.glob("*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="delete it"):
        retrieved_distractors(questions, golds, pool, 3, cache=tmp_path)
    monkeypatch.setenv("DIEKAE_RAG_DISTRACTOR_CACHE", str(tmp_path / "default"))
    ex = retrieval_style(facts, 4, seed=0, pool=pool, distractors="retrieved")
    assert all(len(e.passages) == 4 and f.passage in e.passages for e, f in zip(ex, facts))
    with pytest.raises(ValueError, match="distractors must be"):
        retrieval_style(facts, 2, distractors="nearest")
    assert len(list((tmp_path / "default").glob("*.npy"))) == 1, "mined once, into the cache folder"
