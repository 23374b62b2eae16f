"""Passage states computed at index time, kept on disk with the FAISS store, read back at query time."""

from __future__ import annotations

from conftest import K, Q, _per_step_model

import json

import pytest
import torch

from diekae_rag.state_store import PassageStateStore, StateStoreError
from diekae_rag.indexing import attach_states, index_states

PASSAGES = [p for ps in K for p in ps]
N_NEW = 6


def _fresh():
    """A new model with the same weights and an empty memory cache, as in a new process."""
    model = _per_step_model(isolation=True)
    model.knowledge.passage_cache.max_segments = 0
    return model


def test_stored_states_give_the_answers_of_encoding_and_skip_the_encoders(tmp_path):
    ref = _fresh()
    want = ref.generate_batch(Q, K, max_new_tokens=N_NEW)
    want_nll = ref.score(Q[1], "north", K[1])
    store = index_states(ref, PASSAGES, tmp_path, dtype="float32", progress=False)
    assert len(store) == 4  # the knowledge prefix and three passages

    model = _fresh()
    attach_states(model, tmp_path)
    assert model.generate_batch(Q, K, max_new_tokens=N_NEW) == want
    assert model.score(Q[1], "north", K[1]) == pytest.approx(want_nll, abs=1e-5)
    cache = model.knowledge.passage_cache
    assert cache.misses == 0 and cache.stored > 0, "every passage's states came from the store"
    model.generate(Q[0], ["A passage nobody indexed."], max_new_tokens=2)
    assert cache.misses == 1, "plain text that was never indexed is encoded on first use"


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-3), ("int8", 5e-2), ("int4", 0.3)])
def test_smaller_stored_states_stay_close(tmp_path, dtype, tol):
    ref = _fresh()
    want = ref.score(Q[1], "north", K[1])
    full = index_states(ref, PASSAGES, tmp_path / "f32", dtype="float32", progress=False).bytes
    small = index_states(ref, PASSAGES, tmp_path / dtype, dtype=dtype, progress=False).bytes
    assert small < full * {"float16": 0.6, "int8": 0.4, "int4": 0.3}[dtype]
    model = _fresh()
    attach_states(model, tmp_path / dtype)
    assert model.score(Q[1], "north", K[1]) == pytest.approx(want, abs=tol)
    assert model.knowledge.passage_cache.misses == 0


def _kept_after_reading(folder, dtype: str):
    """A fresh model over a store of ``dtype`` in ``folder`` that keeps what it reads: the model, its
    score read from disk, and the segment states its memory cache kept from a second call."""
    index_states(_fresh(), PASSAGES, folder, dtype=dtype, progress=False)
    model = _fresh()
    attach_states(model, folder)
    from_disk = model.score(Q[1], "north", K[1])
    model.knowledge.passage_cache.max_segments = 8
    assert model.score(Q[1], "north", K[1]) == from_disk
    return model, from_disk, list(model.knowledge.passage_cache._kept._data.values())


def _scores_the_same_from_memory(model, from_disk: float) -> None:
    assert model.score(Q[1], "north", K[1]) == from_disk and model.knowledge.passage_cache.hits > 0, \
        "read from memory this time"


def test_float16_states_stay_float16_in_memory_and_are_cast_as_they_are_assembled(tmp_path):
    """The memory cache keeps states read from a float16 store as they are stored (half the memory of
    float32), and the encoders get them cast: the same score whether they came from disk or memory."""
    model, from_disk, kept = _kept_after_reading(tmp_path, "float16")
    assert kept and all(k.dtype == v.dtype == torch.float16 for s in kept for k, v in s.kv)
    _scores_the_same_from_memory(model, from_disk)


def test_states_are_added_incrementally_and_refused_for_other_weights(tmp_path):
    model = _fresh()
    index_states(model, PASSAGES[:2], tmp_path, progress=False)
    store = index_states(model, PASSAGES, tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(store) == 4 and len(manifest["shards"]) == 2, "only the new passage was encoded, into a new shard"
    assert index_states(model, PASSAGES, tmp_path, progress=False).bytes == store.bytes, "nothing new: nothing written"
    (tmp_path / "shard-00009.safetensors.tmp").write_bytes(b"half a shard")  # a crash mid-write
    assert len(PassageStateStore(tmp_path, model.encoder)) == 4
    with pytest.raises(StateStoreError, match="stored as int4, not int8"):
        index_states(model, PASSAGES, tmp_path, dtype="int8", progress=False)

    other = _fresh()
    with torch.no_grad():
        other.encoder.up.weight.add_(0.01)
    with pytest.raises(StateStoreError, match="other encoder weights.*Rebuild"):
        attach_states(other, tmp_path)
    with pytest.raises(StateStoreError, match="missing"):
        attach_states(other, tmp_path / "nothing")


def test_the_passage_priors_vectors_are_stored_and_read_back(tmp_path):
    from test_gate import TopicEmbedder

    from diekae_rag.copy import PassagePrior
    ref = _per_step_model(isolation=True, passage_prior=30.0)
    ref.passage_prior = PassagePrior(embedder=TopicEmbedder())
    want = ref.score(Q[1], "north", K[1])
    index_states(ref, PASSAGES, tmp_path, dtype="float16", progress=False)
    model = _per_step_model(isolation=True, passage_prior=30.0)
    embedder = TopicEmbedder()
    model.passage_prior = PassagePrior(embedder=embedder)
    attach_states(model, tmp_path)
    assert model.score(Q[1], "north", K[1]) == pytest.approx(want, abs=1e-3)
    assert embedder.texts == [Q[1]], "only the question was embedded: the passages' vectors came from the store"


def test_open_or_build_stores_every_chunks_states_beside_the_index(tmp_path, real_embedder):
    from diekae_rag.retrievers import open_or_build
    from diekae_rag.state_store import states_folder

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, p in enumerate(PASSAGES):
        (docs / f"{i}.md").write_text(p)
    store = open_or_build(docs, tmp_path / "store", embedder=real_embedder, model=_fresh(), progress=False)
    assert (states_folder(tmp_path / "store") / "manifest.json").exists()
    fresh = _fresh()  # a new process: the FAISS store and the states are read back from disk
    attach_states(fresh, states_folder(tmp_path / "store"))
    passages = [p.text for p in store.search(Q[1], k=2)]
    fresh.generate(Q[1], passages, max_new_tokens=2)
    assert fresh.knowledge.passage_cache.misses == 0 and fresh.knowledge.passage_cache.stored == 3


def test_the_answer_readers_passage_sides_are_stored_and_read_back(tmp_path):
    """With a reader whose first layers read the passage alone, index time stores those states too,
    and a new process reads only the question."""
    from diekae_rag.answer_reader import AnswerStartReader, ReaderConfig

    def with_reader(reader):
        model = _per_step_model(isolation=True, reader_weight=1.0)
        model.answer_reader = reader
        return model
    torch.manual_seed(2)
    reader = AnswerStartReader(ReaderConfig(max_length=48, stride=16, separate_layers=4)).eval()
    reader.save_pretrained(tmp_path / "reader")
    reader = AnswerStartReader.from_pretrained(tmp_path / "reader")  # as a model loads it
    ref = with_reader(reader)
    want = ref.score(Q[1], "north", K[1])
    index_states(ref, PASSAGES, tmp_path / "states", progress=False)
    store = PassageStateStore(tmp_path / "states", ref.encoder)
    assert len(store.reader_sides(PASSAGES, reader.fingerprint())) == len(set(PASSAGES))
    assert len(store) == 4, "reader sides are not counted as segments"

    fresh = AnswerStartReader.from_pretrained(tmp_path / "reader")
    model = with_reader(fresh)
    attach_states(model, tmp_path / "states")
    read = []
    real = fresh._read_alone
    fresh._read_alone = lambda texts: read.append(list(texts)) or real(texts)
    assert model.score(Q[1], "north", K[1]) == pytest.approx(want, abs=2e-2)
    assert read == [], "the passages' reader sides came from the store"

    late = AnswerStartReader.from_pretrained(tmp_path / "reader")
    model = _per_step_model(isolation=True, reader_weight=1.0)
    attach_states(model, tmp_path / "states")
    model.answer_reader = late  # a reader set (or loaded) after the store was attached reads it too
    late._read_alone = lambda texts: pytest.fail(f"read {texts} again")
    assert model.score(Q[1], "north", K[1]) == pytest.approx(want, abs=2e-2)


def test_open_or_build_embeds_each_chunk_once(tmp_path, real_embedder, monkeypatch):
    """The passage prior's vectors of the chunks are the FAISS store's when both use the same model."""
    from diekae_rag.copy import PassagePrior
    from diekae_rag.retrievers import open_or_build
    from diekae_rag.state_store import states_folder

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, p in enumerate(PASSAGES):
        (docs / f"{i}.md").write_text(p)
    embedded: list[str] = []
    real = real_embedder.encode
    monkeypatch.setattr(real_embedder, "encode", lambda texts, **kw: embedded.extend(texts) or real(texts, **kw))
    model = _per_step_model(isolation=True, passage_prior=30.0)
    model.passage_prior = PassagePrior(embedder=real_embedder)
    store = open_or_build(docs, tmp_path / "store", embedder=real_embedder, model=model, progress=False)
    texts = [c["text"] for c in store.chunks]
    assert sorted(embedded) == sorted(texts), "each chunk embedded once, for FAISS"
    vecs = PassageStateStore(states_folder(tmp_path / "store"), model.encoder).vectors(texts)
    assert len(vecs) == len(texts)
    for t, v in zip(texts, store.vectors):
        assert vecs[t] == pytest.approx(v)


def test_the_latency_benchmark_times_every_mode_and_reads_the_store():
    from bench import bench_latency
    model = _fresh()
    rows = bench_latency(model, ks=(2,), new_tokens=3, repeats=1)
    assert [r["mode"] for r in rows] == ["none", "in_context", "diekae", "diekae_cold", "diekae_store"]
    assert all(r["ttft_s"] > 0 and r["decoder_tokens"] > 0 for r in rows)
    assert model.knowledge.passage_cache.stored > 0, "the store mode read passage states from disk"


def test_what_the_copy_needs_of_a_passages_tokens_is_stored_and_read_back(tmp_path):
    """Spans, first pieces and answer pieces are stored with the states; a new model attached to the
    store reads them instead of tokenising the passages, and answers as a model that tokenises."""
    def fresh():
        model = _per_step_model(isolation=True, match=True, first_unspaced=True, answer_pieces=True)
        model.knowledge.passage_cache.max_segments = 0
        return model

    ref = fresh()
    want = ref.generate_batch(Q, K, max_new_tokens=N_NEW)
    store = index_states(ref, PASSAGES, tmp_path, dtype="float16", progress=False)
    classes = ref.knowledge.classes
    stored = store.passage_tokens(PASSAGES + ["never indexed"])
    assert set(stored) == set(PASSAGES)
    for p in PASSAGES:
        assert stored[p] == ref.knowledge.passage_tokens.record(p, classes)

    model = fresh()
    attach_states(model, tmp_path)
    model.knowledge.passage_tokens.tokenizer = None  # tokenising a passage now fails
    assert model.generate_batch(Q, K, max_new_tokens=N_NEW) == want
    with pytest.raises((TypeError, AttributeError)):
        model.generate(Q[0], ["A passage nobody indexed."], max_new_tokens=2)


def test_a_passage_the_budget_cuts_takes_the_head_of_its_stored_states(tmp_path):
    """With max_knowledge_tokens cutting the last passage, its states are the first positions of the
    whole passage's stored states (causal encoders, a segment's own positions): nothing is encoded
    in the call, and answers and scores are those of encoding the cut passage."""
    import warnings

    def fresh():
        model = _per_step_model(isolation=True, max_knowledge_tokens=60)
        model.knowledge.passage_cache.max_segments = 0
        return model

    knowledge = ["Marsul is married to Ithpelith.", "Calgra lies in the north and it rains there often."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fresh()
        assert all(len(ref.prompter.ids(p)) <= 60 for p in knowledge), "each passage alone is stored whole"
        assert ref.prompter.whole_segments(knowledge)[2] is not None, "together, the second passage is cut"
        want = ref.generate(Q[0], knowledge, max_new_tokens=N_NEW)
        want_nll = ref.score(Q[0], "Ithpelith", knowledge)
        index_states(ref, knowledge, tmp_path, dtype="float32", progress=False)

        model = fresh()
        attach_states(model, tmp_path)
        assert model.generate(Q[0], knowledge, max_new_tokens=N_NEW) == want
        assert model.score(Q[0], "Ithpelith", knowledge) == pytest.approx(want_nll, abs=1e-4)
    cache = model.knowledge.passage_cache
    assert cache.misses == 0 and cache.cut > 0, "the cut passage's states came from its whole, stored"


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_integer_stores_keep_the_copy_keys_float16_and_read_older_stores(tmp_path, dtype):
    """Under int8 and int4 the encoders' keys and values are quantised and the copy keys are kept in
    float16 (the manifest says so); a store written before, with copy keys in its own dtype and no
    ``keys_dtype``, still reads its keys as it wrote them."""
    ref = _fresh()
    exact = index_states(ref, PASSAGES, tmp_path / "f16", dtype="float16", progress=False)
    small = index_states(ref, PASSAGES, tmp_path / dtype, dtype=dtype, progress=False)
    assert json.loads((tmp_path / dtype / "manifest.json").read_text())["keys_dtype"] == "float16"
    import diekae_rag.state_store as ss
    keys = [k for k in exact._where if ss._is_segment(k)]
    want, got = exact.get_many(keys, torch.device("cpu")), small.get_many(keys, torch.device("cpu"))
    assert want and all(torch.equal(want[k].pointer_keys, got[k].pointer_keys) for k in want)
    assert any(not torch.equal(want[k].kv[0][0], got[k].kv[0][0]) for k in want), "keys and values are quantised"

    older = tmp_path / "older"
    with pytest.MonkeyPatch.context() as mp:  # the writer before: copy keys in the store's dtype, no keys_dtype
        mp.setattr(ss, "keys_dtype", lambda d: d)
        index_states(ref, PASSAGES, older, dtype=dtype, progress=False)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest.pop("keys_dtype")
    (older / "manifest.json").write_text(json.dumps(manifest))
    reopened = PassageStateStore(older, ref.encoder)
    assert reopened.keys_dtype == dtype
    old = reopened.get_many(keys, torch.device("cpu"))
    assert all(torch.allclose(old[k].pointer_keys, want[k].pointer_keys, atol=0.3) for k in want)
    assert any(not torch.equal(old[k].pointer_keys, want[k].pointer_keys) for k in want)


def test_int4_states_stay_packed_in_memory_and_are_unpacked_as_they_are_assembled(tmp_path):
    """The memory cache keeps an int4 store's keys and values packed (a quarter of float16's bytes);
    assembling them gives what unpacking them first gives, and a cut passage's head stays packed."""
    from diekae_rag.passage_cache import Int4States, assemble, head_of
    from diekae_rag.state_store import _is_segment
    model, from_disk, kept = _kept_after_reading(tmp_path, "int4")
    assert kept and all(isinstance(t, Int4States) for s in kept for kv in s.kv for t in kv)
    assert all(t.q4.numel() * 2 == t.shape.numel() and t.q4.dtype == torch.uint8 for s in kept for kv in s.kv for t in kv)
    _scores_the_same_from_memory(model, from_disk)

    store = PassageStateStore(tmp_path, model.encoder)
    keys = [k for k in store._where if _is_segment(k)]
    packed, eager = store.get_many(keys, torch.device("cpu"), None), store.get_many(keys, torch.device("cpu"))
    items = [[packed[k] for k in keys[:2]], [packed[keys[2]]]]
    want = assemble([[eager[s] for s in keys[:2]], [eager[keys[2]]]], room=4, dtype=torch.float32)
    got = assemble(items, room=4, dtype=torch.float32)
    assert all(torch.equal(g, w) for gs, ws in zip(got.cache.kv, want.cache.kv) for g, w in zip(gs, ws))
    head = head_of(packed[keys[1]], 2)
    assert isinstance(head.kv[0][0], Int4States)
    assert torch.equal(head.kv[0][0].unpack(), eager[keys[1]].kv[0][0][:, :, :2])


def test_int4_packs_two_values_a_byte_with_a_scale_per_channel():
    from diekae_rag.state_store import _pack, _unpack
    torch.manual_seed(0)
    t = torch.randn(2, 3, 17, 8) * torch.tensor([1.0, 10, 0.1, 1, 1, 1, 1, 5])  # channels of different sizes
    packed = _pack(t, "int4")
    assert packed["q4"].dtype == torch.uint8 and packed["q4"].shape == (2, 3, 17, 4)
    assert packed["s"].shape == (2, 3, 1, 8)
    back = _unpack(lambda name: packed[name.split(".")[-1]], "x", "int4", torch.float32)
    assert _unpack(lambda name: packed[name.split(".")[-1]], "x", "int4", None).dtype == torch.float16
    step = t.abs().amax(-2, keepdim=True) / 7
    assert ((back - t).abs() <= step / 2 + 1e-3 * step + 1e-6).all(), "each value within half a step of its channel"
    with pytest.raises(ValueError, match="even number of channels"):
        _pack(torch.randn(4, 3), "int4")
