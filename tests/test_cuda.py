"""The CUDA bf16 path on tiny random decoders: injection, per-step rows, training, editing.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
``DIEKAE_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the checks).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import assert_decode_rows_equal_reencode, K, Q, tiny_model

from diekae_rag import DiekaeModel
from bench import PeakMemory
from diekae_rag.data.mixture import Example
from diekae_rag.editing import apply_edits
from diekae_rag.injection import injecting
from diekae_rag.training.phase2 import lm_loss
from diekae_rag.training.trainer import TrainConfig, train

DEVICE = os.environ.get("DIEKAE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_model(nonzero: bool = True, dtype: torch.dtype = torch.bfloat16, **cfg) -> DiekaeModel:
    return tiny_model(nonzero=nonzero, device=DEVICE, dtype=dtype, **cfg)


def test_loads_on_cuda_in_bf16_and_zero_encoders_change_nothing():
    model = cuda_model(nonzero=False)
    assert model.device.type == DEVICE and model.decoder.dtype == torch.bfloat16
    assert all(p.device.type == DEVICE for p in model.encoder.parameters())
    prompts, passages = model.prepare(Q, K, "diekae")
    answers = [model.prompter.answer_ids("Ithpelith"), model.prompter.answer_ids("north")]
    ids, mask = model.prompter.pad([p + a for p, a in zip(prompts, answers)], model.device, side="right")
    inj = model.build_injection(prompts, passages, mask, answers)
    with torch.no_grad():
        plain = model.decoder(input_ids=ids, attention_mask=mask).logits
        with injecting(inj):
            injected = model.decoder(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, injected)


@pytest.mark.parametrize("isolation", [False, True])
def test_per_step_decode_rows_equal_full_reencode_on_cuda(isolation):
    model = cuda_model(dtype=torch.float32, per_step=True, pointer_layer=3, pointer_heads=2,
                       passage_isolation=isolation)
    assert_decode_rows_equal_reencode(model, atol=1e-3, rtol=1e-2)


def test_generate_stream_and_score_in_every_mode_on_cuda():
    model = cuda_model(per_step=True, pointer_layer=3)
    for mode in ("none", "in_context", "diekae"):
        text = model.generate(Q[0], K[0], mode=mode, max_new_tokens=4)
        assert isinstance(text, str)
        assert "".join(model.stream(Q[0], K[0], mode=mode, max_new_tokens=4)).strip() == text
        assert math.isfinite(model.score(Q[0], "Ithpelith", K[0], mode=mode))
    exact = cuda_model(dtype=torch.float32, per_step=True, pointer_layer=3)  # bf16 rounding can flip ties
    assert exact.generate_batch(Q, K, max_new_tokens=4) == [exact.generate(q, k, max_new_tokens=4)
                                                             for q, k in zip(Q, K)]


def test_training_with_bf16_autocast_only_moves_encoders(tmp_path):
    model = cuda_model(nonzero=False, per_step=True, pointer_layer=3)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    cfg = TrainConfig(out=str(tmp_path / "run"), data={"fictional": 60}, batch_size=8, epochs=1, dev_size=16,
                      eval_every=2, lr=3e-3, warmup_steps=1)
    summary = train(cfg, model)
    assert summary["steps"] == (60 - 16) // 8 and summary["device"].startswith(DEVICE)
    assert all(math.isfinite(h["dev_loss"]) for h in summary["history"])
    assert model.encoder.up.weight.abs().sum() > 0, "the encoders learnt something"
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, before[k]), f"decoder weight {k} changed"
    again = DiekaeModel.from_pretrained(tmp_path / "run" / "best", decoder=model.decoder, tokenizer=model.tokenizer)
    assert again.encoder.up.weight.device.type == DEVICE
    ex = [Example(Q[0], K[0], "Ithpelith", "north")]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert math.isfinite(float(lm_loss(again, ex).detach()))


def test_edit_encoder_trains_on_cuda_and_detaches():
    model = cuda_model(nonzero=False)
    plain = model.score("Where is Calgra?", "north", mode="none")
    enc = apply_edits(model, [{"subject": "Calgra", "prompt": "Where is Calgra?", "target_old": "north",
                              "target_new": "south"}], steps=5, progress=False)
    assert enc.up.weight.device.type == DEVICE
    model.remove_edits()
    assert model.score("Where is Calgra?", "north", mode="none") == pytest.approx(plain, abs=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA allocator")
def test_peak_memory_reads_cuda_allocations():
    with PeakMemory(torch.device("cuda")) as mem:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert mem.peak >= 64 * 2**20


def test_compiled_decode_steps_give_the_eager_tokens_on_cuda():
    """CUDA graphs (``reduce-overhead``) on the GPU; in float32, so that fused kernels cannot flip a token."""
    torch._dynamo.reset()
    model = cuda_model(dtype=torch.float32, per_step=True, pointer_layer=3, pointer_heads=2)
    eager = {m: model.generate_batch(Q, K, mode=m, max_new_tokens=6, min_new_tokens=6) for m in ("diekae", "none")}
    model.compile_decode()
    assert model.decode_compile.mode == ("reduce-overhead" if DEVICE == "cuda" else "default")
    for _ in range(2):  # the second call replays the captured graphs
        for m in ("diekae", "none"):
            assert model.generate_batch(Q, K, mode=m, max_new_tokens=6, min_new_tokens=6) == eager[m], m
    torch._dynamo.reset()
