"""Compiled decode steps (``DiekaeModel.compile_decode``) give the eager answers, on the CPU.

The GPU form (CUDA graphs) is checked in ``test_cuda.py``; here ``aot_eager`` checks what dynamo
traces (the hooks' buffer, the eager pre-hook between graphs) quickly, and one test runs the
inductor backend that serving uses on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import in_threads, K, Q, tiny_model
from torch._dynamo.utils import counters

N_NEW = 6
MODES = ("diekae", "none", "in_context")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test's tiny decoder is new: without a reset, dynamo's recompile limit would be reached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    return tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3, pointer_heads=2)


def _ids(model, mode: str, questions=Q, knowledges=K) -> list[list[int]]:
    return [o.tolist() for o in model._generate_ids(model.prepare(questions, knowledges, mode), mode, N_NEW, min_new_tokens=N_NEW)]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_decode_steps_give_the_eager_tokens_in_every_mode():
    model = _model()
    eager = {mode: _ids(model, mode) for mode in MODES}
    assert eager["diekae"] != eager["none"]  # the check below would hold for encoders that do nothing
    before = _graphs()
    model.compile_decode(backend="aot_eager")
    hooks = model.decoder._diekae_hooks
    for mode in MODES:
        assert _ids(model, mode) == eager[mode], mode
        if mode == "diekae":  # the last decode step's rows went through the compiled graph's buffer
            assert hooks.step_rows.abs().sum() > 0
        elif mode == "none":
            assert hooks.step_rows.abs().sum() == 0
    assert _graphs() > before  # the decoder was compiled, not run eagerly
    model.compile_decode(backend=None)
    assert model.decode_compile is None and _ids(model, "diekae") == eager["diekae"]


def test_compiled_decode_streams_in_batches_and_threads_as_eager():
    model = _model()
    want = [model.generate(q, k, max_new_tokens=N_NEW) for q, k in zip(Q, K)]
    model.compile_decode(backend="aot_eager", cache_block=64)
    assert model.generate_batch(Q, K, max_new_tokens=N_NEW) == want
    assert "".join(model.stream(Q[0], K[0], max_new_tokens=N_NEW)).strip() == want[0]
    assert in_threads(lambda i: model.generate(Q[i], K[i], max_new_tokens=N_NEW), 2) == want


def test_an_eager_call_beside_a_compiled_one_on_the_same_decoder_leaves_its_steps_alone():
    from diekae_rag import DiekaeModel
    model = _model()
    eager = DiekaeModel(model.decoder, model.tokenizer, model.encoder, copy=model.copy)
    want = model.generate(Q[0], K[0], max_new_tokens=N_NEW)
    other = eager.generate(Q[1], K[1], max_new_tokens=N_NEW)
    model.compile_decode(backend="aot_eager")
    calls = [lambda: model.generate(Q[0], K[0], max_new_tokens=N_NEW),
             lambda: eager.generate(Q[1], K[1], max_new_tokens=N_NEW)]
    assert in_threads(lambda i: [calls[i % 2]() for _ in range(3)], 4) == [[want] * 3, [other] * 3] * 2


def test_compiled_decode_with_the_inductor_backend():
    model = _model()
    eager = {mode: _ids(model, mode, Q[:1], K[:1]) for mode in ("diekae", "none")}
    model.compile_decode()  # inductor, the CPU's serving form
    assert model.decode_compile.backend == "inductor" and model.decode_compile.mode == "default"
    before = _graphs()
    for mode in ("diekae", "none"):  # one graph serves both: zeros in the buffer where nothing is injected
        assert _ids(model, mode, Q[:1], K[:1]) == eager[mode], mode
    assert _graphs() > before


def test_compile_decode_rejects_a_cache_block_below_one():
    with pytest.raises(ValueError, match="cache_block"):
        _model().compile_decode(cache_block=0)
