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
# The child stalls its N-th atomic rename (the commit point of one file: its new bytes are all in the
# temp file), says so, and is killed there: the kill lands while the save is being written, always.
_STALL = """
import os, time
import diekae_rag.atomic as atomic
calls = [0]
def stalled(src, dst, _replace=os.replace):
    calls[0] += 1
    if calls[0] == {stall}:
        print("writing", src, flush=True)
        time.sleep(600)
    _replace(src, dst)
atomic.os.replace = stalled
"""

_SAVE_LOOP = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    model = tiny_model(nonzero=False)
    with torch.no_grad():
        model.encoder.up.weight.fill_(1.0)  # the new save's bytes differ from the saved zeros
""")

_STORE_LOOP = textwrap.dedent("""
    import numpy as np
    from diekae_rag.retrievers import PassageStore
    store = PassageStore()
    rng = np.random.default_rng(0)
    def add():
        v = rng.standard_normal((200, store.embedder.dim)).astype("float32")
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        store.add_vectors(v, [{"doc_id": "d", "chunk_index": len(store) + j, "text": "t" * 50, "metadata": {}}
                              for j in range(200)])
""")


def _kill_while_writing(code: str, timeout: float = 120) -> str:
    """Run ``code`` until it prints that it stalls a rename, kill it there; the temp file it stalled on."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("writing "), f"the save never reached its stalled rename: {line!r}"
        tmp = line.split(" ", 1)[1]
        assert Path(tmp).exists(), "the kill lands while the new file is written, not yet in place"
        return tmp
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)


def test_kill_during_checkpoint_save_keeps_a_complete_checkpoint(tmp_path):
    path = tmp_path / "enc"
    tiny_model(nonzero=False).save_pretrained(path)
    code = _SAVE_LOOP.format(tests=str(ROOT / "tests")) + _STALL.format(stall=1) + f"model.save_pretrained({str(path)!r})\n"
    tmp = _kill_while_writing(code)
    assert Path(tmp).parent == path and Path(tmp).stat().st_size > 0, "the new weights were being written"
    model = tiny_model(nonzero=False)
    loaded = DiekaeModel.from_pretrained(path, decoder=model.decoder, tokenizer=model.tokenizer)
    assert bool((loaded.encoder.up.weight == 0).all()), "the old checkpoint, whole"
    # the same save, not killed, is the new one
    subprocess.run([sys.executable, "-c", _SAVE_LOOP.format(tests=str(ROOT / "tests")) +
                    f"model.save_pretrained({str(path)!r})\n"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = DiekaeModel.from_pretrained(path, decoder=model.decoder, tokenizer=model.tokenizer)
    assert bool((loaded.encoder.up.weight == 1).all())


@pytest.mark.parametrize("stall", [1, 2, 3, 4])  # chunks, embeddings, index, manifest of the second save
def test_kill_during_store_save_keeps_a_complete_store(tmp_path, stall, real_embedder):
    path = tmp_path / "store"
    code = (_STORE_LOOP + f"add()\nstore.save({str(path)!r})\nadd()\n" + _STALL.format(stall=stall) +
            f"store.save({str(path)!r})\n")
    _kill_while_writing(code)
    store = PassageStore.load(path, real_embedder)
    assert len(store) == 200 == store.index.ntotal == len(store.vectors), "the first save, whole"


# 8. loading while another process appends -------------------------------------------------
_APPEND_LOOP = textwrap.dedent("""
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

def test_loading_while_another_process_appends(tmp_path, real_embedder):
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", _APPEND_LOOP.format(path=str(path))], stdout=subprocess.PIPE,
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


def test_a_question_longer_than_the_decoder_reads_gets_a_clear_error():
    model = tiny_model()
    limit = model.decoder.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"the decoder reads at most {limit}. Shorten the question"):
        model.generate("why " * limit, K[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="mode='diekae'"):
        model.generate(Q[0], ["word " * limit], mode="in_context", max_new_tokens=2)
    assert model.generate(Q[0], ["word " * limit], max_new_tokens=2) is not None, "passages to the encoders are cut, with a warning"
