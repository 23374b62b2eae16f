"""The encoder checkpoint format: ``model.safetensors`` + ``config.json`` (like a PEFT adapter).

The config is also stored inside the safetensors metadata, which is the source of truth:
each file is written atomically, so a crash between the two writes still leaves a
weights file that describes itself. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .config import DiekaeConfig
from .encoder import DiekaeEncoder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_META_KEY = "diekae_config"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or incompatible; the message names the file."""


class DecoderMismatchError(CheckpointError):
    """A checkpoint was trained for a different decoder than the one it is attached to."""


def save_encoder(encoder: DiekaeEncoder, path: str | Path, extra_tensors: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``encoder`` to the folder ``path`` (created if needed), atomically per file.

    ``dtype`` (e.g. ``torch.float16`` for the shipped weights) converts floating tensors."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; choose a folder path for the checkpoint.")
    state = {k: v.detach().to("cpu", dtype=dtype if (dtype and v.is_floating_point()) else v.dtype).contiguous()
             for k, v in encoder.state_dict().items()}
    state.update(extra_tensors or {})
    meta = {_META_KEY: encoder.config.to_json(), "format": "pt"}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata=meta))
    atomic_write_text(path / CONFIG_NAME, encoder.config.to_json() + "\n")
    return path


def read_config(path: str | Path) -> DiekaeConfig:
    """The config of the checkpoint at ``path`` (read from the weights file's metadata)."""
    weights = _weights_file(path)
    try:
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}). Restore it or re-save the encoders.") from exc
    if _META_KEY not in meta:
        cfg_file = Path(path) / CONFIG_NAME
        if not cfg_file.exists():
            raise CheckpointError(f"{weights} carries no diekae config and {cfg_file} is missing.")
        return DiekaeConfig.from_json_file(cfg_file)
    try:
        return DiekaeConfig.from_dict(json.loads(meta[_META_KEY]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: bad encoder config ({exc}).") from exc


def load_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None
                 ) -> tuple[DiekaeEncoder, dict[str, torch.Tensor]]:
    """Load encoders from ``path``; returns the module and any extra tensors stored beside it."""
    config = read_config(path)
    weights = _weights_file(path)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}). Restore it or re-save the encoders.") from exc
    encoder = DiekaeEncoder(config)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or wrong:
        raise CheckpointError(f"{weights} does not match its config: missing {missing[:5]}, "
                              f"wrong shapes {wrong[:5]}. Re-save the encoders.")
    encoder.load_state_dict({k: state[k] for k in own})
    extras = {k: v for k, v in state.items() if k not in own}
    return encoder.to(device=device, dtype=dtype or torch.float32), extras


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"No encoder checkpoint folder at {path}.")
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = (f" Found {pickles}: diekae-rag never loads pickle files (loading them can run code); "
                "convert them to safetensors.") if pickles else ""
        raise CheckpointError(f"{weights} is missing.{hint}")
    return weights
