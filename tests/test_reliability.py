"""Bad input, faults and concurrency: clear errors, and nothing lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, in_threads, K, Q, tiny_model

from diekae_rag import CheckpointError, DecoderMismatchError, DiekaeModel, KnowledgeTruncatedWarning
from diekae_rag.retrievers import PassageStore, StoreError

ROOT = Path(__file__).resolve().parents[1]


# 1. empty and blank input ------------------------------------------------------------------
def test_empty_inputs_get_clear_errors_or_defined_behaviour():
    model = tiny_model()
    with pytest.raises(ValueError, match="question is empty"):
        model.generate("   ", K[0])
    with pytest.raises(TypeError, match="question must be a str"):
        model.generate(None, K[0])
    with pytest.raises(TypeError, match="Cannot use a bytes as a passage"):
        model.generate(Q[0], [b"bytes"])
    with pytest.raises(ValueError, match="mode must be one of"):
        model.generate(Q[0], K[0], mode="rag")
    with pytest.raises(ValueError, match="non-empty"):
        model.score(Q[0], "", K[0])
    none = model.generate(Q[0], mode="none", max_new_tokens=4)
    assert model.generate(Q[0], [], max_new_tokens=4) == none, "knowledge=[] means no knowledge"
    with pytest.warns(UserWarning, match="Dropped 2 empty"):
        assert model.generate(Q[0], ["", "  \n"], max_new_tokens=4) == none
    with pytest.warns(UserWarning, match="Dropped 1 empty"):
        assert model.generate(Q[0], K[0] + [" "], max_new_tokens=4) == model.generate(Q[0], K[0], max_new_tokens=4)


# 2. knowledge longer than the encoders read -------------------------------------------------
@pytest.mark.parametrize("isolation", [False, True])
def test_long_knowledge_is_cut_with_a_warning_that_says_what(isolation):
    model = tiny_model(max_knowledge_tokens=64, passage_isolation=isolation)
    with pytest.warns(KnowledgeTruncatedWarning, match=r"cut \d+ tokens from \d+ of 1000 passage") as rec:
        out = model.generate(Q[0], [f"Fact number {i} is here." for i in range(1000)], max_new_tokens=3)
    assert isinstance(out, str)
    assert "max_knowledge_tokens" in str(rec[0].message)
    with pytest.warns(KnowledgeTruncatedWarning, match="cut 36 tokens from 1 of 1"):
        model.score(Q[0], "x", ["y" * 100])


# 4. corrupt checkpoints, other decoders, pickles ---------------------------------------------
def test_corrupt_checkpoint_names_the_file_and_keeps_it(tmp_path):
    model = tiny_model()
    ck = model.save_pretrained(tmp_path / "enc")
    weights = ck / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    truncated = weights.read_bytes()
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        DiekaeModel.from_pretrained(ck, decoder=model.decoder, tokenizer=model.tokenizer)
    assert weights.read_bytes() == truncated, "a failed load changes nothing on disk"
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        DiekaeModel.from_pretrained(ck, decoder=model.decoder, tokenizer=model.tokenizer)


def test_checkpoint_for_another_decoder_is_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "enc")
    other = tiny_model("qwen2", nonzero=False)
    with pytest.raises(DecoderMismatchError, match=str(tmp_path / "enc")):
        DiekaeModel.from_pretrained(tmp_path / "enc", decoder=other.decoder, tokenizer=byte_tokenizer())


def test_pickle_files_are_rejected(tmp_path):
    model = tiny_model()
    (tmp_path / "a").mkdir()
    torch.save(model.encoder.state_dict(), tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        DiekaeModel.from_pretrained(tmp_path / "a", decoder=model.decoder, tokenizer=model.tokenizer)
    (tmp_path / "b").mkdir()
    torch.save({"x": torch.zeros(2)}, tmp_path / "b" / "model.safetensors")  # a pickle in disguise
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        DiekaeModel.from_pretrained(tmp_path / "b", decoder=model.decoder, tokenizer=model.tokenizer)


def test_no_pickle_loading_anywhere_in_the_code():
    bad = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle=True|cloudpickle")
    offenders = [str(p) for d in ("diekae_rag", "retrievers", "integrations", "examples", "benchmarks")
                 for p in (ROOT / d).rglob("*.py") if bad.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


# 5. a crash mid-save leaves the previous state intact ---------------------------------------
_SAVE_LOOP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    model = tiny_model()
    print("ready", flush=True)
    i = 0
    while True:
        with torch.no_grad():
            model.encoder.up.weight.fill_(float(i % 2))
        model.save_pretrained({path!r})
        i += 1
""")

_STORE_LOOP = textwrap.dedent("""
    import numpy as np
    from diekae_rag.retrievers import PassageStore
    store = PassageStore()
    rng = np.random.default_rng(0)
    print("ready", flush=True)
    while True:
        v = rng.standard_normal((200, store.embedder.dim)).astype("float32")
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store.add_vectors(v, [{{"doc_id": "d", "chunk_index": len(store) + j, "text": "t" * 50, "metadata": {{}}}}
                              for j in range(200)])
        store.save({path!r})
""")


def _run_and_kill(code: str, after: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("after", [0.3, 0.7, 1.1])
def test_kill_during_checkpoint_save_keeps_a_complete_checkpoint(tmp_path, after):
    path = tmp_path / "enc"
    tiny_model(nonzero=False).save_pretrained(path)
    _run_and_kill(_SAVE_LOOP.format(tests=str(ROOT / "tests"), path=str(path)), after)
    model = tiny_model(nonzero=False)
    loaded = DiekaeModel.from_pretrained(path, decoder=model.decoder, tokenizer=model.tokenizer)
    w = loaded.encoder.up.weight
    assert bool((w == 0).all()) or bool((w == 1).all()), "the weights are one whole save, never a mix"


@pytest.mark.parametrize("after", [2.5, 3.5])
def test_kill_during_store_save_keeps_a_complete_store(tmp_path, after, real_embedder):
    path = tmp_path / "store"
    _run_and_kill(_STORE_LOOP.format(path=str(path)), after)
    if not (path / "manifest.json").exists():
        pytest.skip("killed before the first save finished")
    store = PassageStore.load(path, real_embedder)
    assert len(store) % 200 == 0 and len(store) == store.index.ntotal == len(store.vectors)


# 8. loading while another process appends -------------------------------------------------
def test_loading_while_another_process_appends(tmp_path, real_embedder):
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _STORE_LOOP.format(path=str(path))], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 20
        while not (path / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        loads, errors = 0, 0
        end = time.time() + 4
        while time.time() < end:
            try:
                s = PassageStore.load(path, real_embedder)
            except StoreError as exc:
                errors += 1
                assert "store" in str(exc).lower()
                continue
            assert len(s) == s.index.ntotal == len(s.vectors) == len(s.chunks)
            loads += 1
        assert loads > 0
    finally:
        proc.kill()
        proc.wait()


# 6. concurrency: one model and one retriever shared by 8 threads -------------------------------
def test_eight_threads_share_a_model_and_a_retriever(real_embedder):
    model = tiny_model(per_step=True, pointer_layer=3)
    store = PassageStore(real_embedder)
    store.add_documents([], progress=False)
    from diekae_rag.retrievers import Document
    store.add_documents([Document(f"d{i}", f"Document {i}: the code word of group {i} is zeta{i}.")
                         for i in range(8)], progress=False)
    questions = [f"What is the code word of group {i}?" for i in range(8)]

    def call(i):
        if i % 4 == 3:  # an exception inside a call must not leave injection behind
            with pytest.raises(ValueError):
                model.generate(questions[i], ["x"], max_new_tokens=4, num_beams=2)
        passages = [p.text for p in store.search(questions[i], 2)]
        return passages, model.generate(questions[i], passages, max_new_tokens=5)

    alone = [call(i) for i in range(8)]
    assert in_threads(call, 8) == alone
