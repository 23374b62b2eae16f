"""Fixtures: tiny random-weight decoders (mechanics only) and the real models, loaded once."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

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
