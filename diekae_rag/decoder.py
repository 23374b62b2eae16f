"""Loading the frozen decoder and choosing its device and dtype."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, PreTrainedModel, PreTrainedTokenizerBase

from .defaults import DEFAULT_DECODER, default_decoder_path

_LOADED: dict[tuple, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}
_LOCK = threading.Lock()


def pick_device(device: Optional[Union[str, torch.device]] = None,
                dtype: Optional[torch.dtype] = None) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when available, otherwise CPU with fp32; arguments override."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def resolve_decoder_path(name: str) -> str:
    """Turn a decoder name (``embedded:...``, a folder or a hub id) into something to load."""
    if name == DEFAULT_DECODER or name.startswith("embedded:"):
        return str(default_decoder_path())
    return name


def load_decoder(name: str = DEFAULT_DECODER, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen decoder and its tokenizer once per process (later calls share it)."""
    device, dtype = pick_device(device, dtype)
    key = (name, str(device), str(dtype))
    with _LOCK:
        if key not in _LOADED:
            path = resolve_decoder_path(name)
            if not Path(path).exists() and "/" not in path:
                raise FileNotFoundError(f"Decoder {name!r} is neither a folder nor a hub id; "
                                        "pass a local transformers folder or a loaded model.")
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
            _LOADED[key] = (freeze(model), tok)
        return _LOADED[key]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the decoder's weights never change."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def decode_compile_config(device: torch.device, mode: Optional[str] = None, backend: Optional[str] = "inductor",
                          cache_block: int = 256) -> Optional[CompileConfig]:
    """The ``torch.compile`` settings of decode steps with a static KV cache (``mode``: default
    ``"reduce-overhead"``, CUDA graphs, on a GPU, and inductor's default on the CPU); None for
    ``backend=None`` (eager). The prefill and the encoders' per-step work stay eager. The static cache
    is sized in multiples of ``cache_block`` tokens so that longer prompts rarely recompile; each new
    batch size or cache size compiles once more (past torch's recompile limit, calls run eagerly)."""
    if backend is None:
        return None
    if cache_block < 1:
        raise ValueError("cache_block must be at least 1 token.")
    if mode is None:
        mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    cfg = CompileConfig(fullgraph=False, dynamic=False, backend=backend, mode=mode)
    cfg._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return cfg


def static_cache_kwargs(cfg: CompileConfig, need: int, cache_block: int) -> dict:
    """``generate`` arguments for compiled decode steps over ``need`` positions."""
    return dict(cache_implementation="static", compile_config=cfg,
                max_cache_len=-(-need // cache_block) * cache_block)


def decoder_and_tokenizer(decoder: Optional[Union[str, PreTrainedModel]], tokenizer: Optional[PreTrainedTokenizerBase],
                          default: str, device=None, dtype: Optional[torch.dtype] = None
                          ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A loaded decoder as it is (shared, never copied), with its own tokenizer unless one is given;
    else the decoder named ``decoder`` (or ``default``), loaded once per process."""
    if isinstance(decoder, PreTrainedModel):
        return decoder, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(decoder.name_or_path)
    dec, tok = load_decoder(decoder or default, device, dtype)
    return dec, tokenizer or tok
