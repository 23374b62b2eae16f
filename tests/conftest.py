"""Fixtures: tiny random-weight decoders (mechanics only) and the real models, loaded once."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest
import torch

from diekae_rag.injection import decoder_layers

FIXTURES = Path(__file__).parent / "fixtures"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark helpers (benchmarks/bench.py) that tests check
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def in_threads(call, n: int) -> list:
    """``[call(0), ..., call(n - 1)]``, each call in its own thread, all started together; the first
    exception any of them raised is raised here."""
    got, errors = [None] * n, []

    def run(i):
        try:
            got[i] = call(i)
        except BaseException as exc:  # noqa: BLE001 - raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


def byte_tokenizer():
    """A byte-level tokenizer with chat specials (no download, 259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_decoder(arch: str = "llama", seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  eos_token_id=2, pad_token_id=0, bos_token_id=1, tie_word_embeddings=False)
    model = model_cls(cfg).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def tiny_model(arch: str = "llama", nonzero: bool = True, seed: int = 0, device=None, dtype=None, **cfg_kwargs):
    """A DiekaeModel on a tiny random decoder; ``nonzero`` gives encoders random up-projections.
    ``cfg_kwargs``: EncoderConfig fields, and CopyConfig fields (on top of the plain readout)."""
    from diekae_rag import CopyConfig, DiekaeModel, EncoderConfig
    from diekae_rag.copy.config import FIELDS
    base = dict(layers=[1, 2], d_enc=32, n_blocks=2, n_heads=2, system_prompt="")
    base.update({k: v for k, v in cfg_kwargs.items() if k not in FIELDS})
    copy = CopyConfig.plain().replace(**{k: v for k, v in cfg_kwargs.items() if k in FIELDS})
    model = DiekaeModel.from_pretrained(decoder=tiny_decoder(arch, seed).to(device, dtype), tokenizer=byte_tokenizer(),
                                        config=EncoderConfig(**base), copy=copy)
    if nonzero:
        randomize(model.encoder, seed)
    return model


def randomize(encoder, seed: int = 0) -> None:
    """Give zero-initialised outputs (up-projection, pointer gain) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if encoder.up is not None:
            encoder.up.weight.copy_(torch.randn(encoder.up.weight.shape, generator=g) * 0.3)
        head = encoder.copy_head
        if head is not None:
            head.gain.copy_(torch.rand(head.gain.shape, generator=g) * 0.05 + 0.01)
        if encoder.config.pointer_match:
            head.match_weight.copy_(torch.rand(head.match_weight.shape, generator=g) * 0.2 + 0.1)


@pytest.fixture(scope="session")
def real_model():
    """The real embedded SmolLM2 + shipped encoders, loaded once per test session."""
    from diekae_rag import DiekaeModel
    return DiekaeModel.from_pretrained()


@pytest.fixture(scope="session")
def real_embedder():
    from diekae_rag.retrievers.embeddings import Embedder
    return Embedder()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# -- shared by the injection tests: two items, their passages, and what the hooks add ----------
Q = ["Who is Marsul married to?", "Where?"]
K = [["Marsul is married to Ithpelith."], ["Calgra lies in the north.", "It rains there."]]


def _record_deltas(model):
    """Hooks that record, per forward call, what the injection added to each MLP output."""
    raw, final, calls = {}, {}, []
    handles = []
    for i, layer in enumerate(decoder_layers(model.decoder)):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: raw.__setitem__(i, o.clone()), prepend=True))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: final.__setitem__(i, o.clone())))
    handles.append(model.decoder.get_decoder().register_forward_hook(
        lambda m, a, o: calls.append({i: final[i] - raw[i] for i in raw})))
    return calls, handles


N_NEW = 5


def _per_step_model(pointer: bool = True, isolation: bool = False, match: bool = False, **cfg):
    return tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3 if pointer else None, pointer_heads=2,
                      passage_isolation=isolation, pointer_match=match, **cfg)


def _generate_and_record(model, questions, knowledges):
    calls, handles = _record_deltas(model)
    try:
        texts = model.generate_batch(questions, knowledges, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    finally:
        for h in handles:
            h.remove()
    return texts, calls


def _reencoded_rows(model, questions, knowledges, texts_ids):
    prompts, passages = model.prepare(questions, knowledges, "diekae")
    answers = [g[:-1] for g in texts_ids]  # the last token is never fed back
    _, mask = model.prompter.pad([p + a for p, a in zip(prompts, answers)], model.device, side="right")
    with torch.no_grad():
        inj = model.build_injection(prompts, passages, mask, answers)
    return prompts, inj.sessions[0].layer_rows


def assert_decode_rows_equal_reencode(model, atol: float = 2e-4, rtol: float = 1e-3, rel: Optional[float] = None) -> None:
    """The rows injected at each decode step equal those of a full re-encode of the same sequence
    (``rel``: instead, each row lies within that share of its norm)."""
    gen = model._generate_ids(model.prepare(Q, K, "diekae"), "diekae", N_NEW, min_new_tokens=N_NEW)
    gen = [g.tolist() for g in gen]
    _, calls = _generate_and_record(model, Q, K)
    prompts, rows = _reencoded_rows(model, Q, K, gen)
    hooked = model.config.hooked_layers
    assert len(calls) == N_NEW
    for j in range(N_NEW - 1):
        step = calls[j + 1]
        for layer in hooked:
            for b, p in enumerate(prompts):
                got, want = step[layer][b, 0], rows[layer][b, len(p) + j]
                assert want.abs().sum() > 0
                if rel is None:
                    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
                else:
                    assert float((got - want.to(got.dtype)).norm() / want.norm()) < rel
        for layer, d in step.items():
            if layer not in hooked:
                assert (d == 0).all()


def _first_position_rows(model) -> tuple[list, list]:
    """Pointer-layer rows for Q, K in left-padded generation (plus its first decode step) and right-padded
    teacher forcing, and each item's position that predicts the first answer token in both layouts."""
    prompts, passages = model.prepare(Q, K, "diekae")
    answers = [model.prompter.answer_ids("Ab"), model.prompter.answer_ids("Xyz")]
    layer = model.config.pointer_layer
    _, left = model.prompter.pad(prompts, model.device, side="left")
    _, right = model.prompter.pad([p + a for p, a in zip(prompts, answers)], model.device, side="right")
    with torch.no_grad():
        gen = model.build_injection(prompts, passages, left).sessions[0]
        step = gen.step(torch.tensor([[answers[0][0]], [answers[1][0]]]))[layer]
        forced = model.build_injection(prompts, passages, right, answers).sessions[0].layer_rows[layer]
    # left padding: every prompt ends at the last column; right padding: at its own length
    return [gen.layer_rows[layer], forced, step], [(left.shape[1] - 1, len(p) - 1) for p in prompts]


def _assert_only_first_rows_differ(before: list, after: list, firsts: list, check_first) -> None:
    """Generation and teacher-forced rows are equal outside each item's first position, where
    ``check_first(before_row, after_row)`` holds; the decode step is unchanged."""
    for b, ats in enumerate(firsts):
        for rows0, rows1, at in zip(before[:2], after[:2], ats):
            assert rows0[b, at].abs().sum() > 0
            check_first(rows0[b, at], rows1[b, at])
            keep = torch.ones(rows0.shape[1], dtype=torch.bool)
            keep[at] = False
            torch.testing.assert_close(rows1[b, keep], rows0[b, keep])
    torch.testing.assert_close(after[2], before[2])
