"""The encoder checkpoint format, like a PEFT adapter: a config plus weights, attached to a base model.

    model.safetensors   the encoders' weights; their EncoderConfig is also in its metadata
    config.json         the EncoderConfig (shape, layers, template): pinned to the weights
    copy.json           the CopyConfig: the copy readout's serving-time settings (edit freely)

Each file is written atomically, so a crash between two writes still leaves a weights file that
describes itself. A ``config.json`` that disagrees with the weights' own config is refused (the
shape cannot be edited; serving settings belong in ``copy.json``). Checkpoints of format 1
(one config for both, other weight names) load through :func:`diekae_rag.config.migrate`.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .config import EncoderConfig, decoder_fingerprint, migrate, read_json
from .copy.config import CopyConfig
from .encoder import DiekaeEncoder

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_META_KEY = "diekae_config"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe or incompatible; the message names the file."""


class DecoderMismatchError(CheckpointError):
    """A checkpoint was trained for a different decoder than the one it is attached to."""


# Format 1 kept the copy head's weights on the encoder itself.
FORMAT1_WEIGHTS = {"pointer_q.weight": "copy_head.q.weight", "pointer_k.weight": "copy_head.k.weight",
                   "pointer_null": "copy_head.null", "pointer_gain": "copy_head.gain",
                   "pointer_match_weight": "copy_head.match_weight"}


def save_encoder(encoder: DiekaeEncoder, path: str | Path, extra_tensors: Optional[dict] = None,
                 dtype: Optional[torch.dtype] = None, copy: Optional[CopyConfig] = None) -> Path:
    """Write ``encoder`` (and its copy settings ``copy``, when given) to the folder ``path`` (created
    if needed), atomically per file.

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
    if copy is not None:
        copy.save(path)
    return path


def read_config(path: str | Path) -> EncoderConfig:
    """The encoder config of the checkpoint at ``path`` (from the weights file's metadata)."""
    return _read(path)[0]


def read_copy_config(path: str | Path) -> Optional[CopyConfig]:
    """The checkpoint's copy settings: its ``copy.json``, else a format-1 config's, else None."""
    return read_checkpoint(path)[1]


def read_checkpoint(path: str | Path) -> tuple[EncoderConfig, Optional[CopyConfig]]:
    """The encoder config and the copy settings of the checkpoint at ``path``, each file parsed once."""
    config, format1_copy = _read(path)
    return config, CopyConfig.load(path) or format1_copy


def _read(path: str | Path) -> tuple[EncoderConfig, Optional[CopyConfig]]:
    weights = _weights_file(path)
    try:
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}). Restore it or re-save the encoders.") from exc
    cfg_file = Path(path) / CONFIG_NAME
    try:
        if _META_KEY not in meta:
            if not cfg_file.exists():
                raise CheckpointError(f"{weights} carries no diekae config and {cfg_file} is missing.")
            return migrate(read_json(cfg_file))
        config, copy = migrate(json.loads(meta[_META_KEY]))
        if cfg_file.exists():
            edited = migrate(read_json(cfg_file))[0].to_dict()
            differ = sorted(k for k, v in config.to_dict().items() if edited.get(k) != v)
            if differ:
                raise CheckpointError(
                    f"{cfg_file} differs from the config saved with the weights in {weights.name} ({', '.join(differ)}). "
                    "The weights' shape and template cannot be edited; copy settings belong in copy.json. "
                    "Restore config.json or re-save the encoders.")
        return config, copy
    except (ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{weights}: bad encoder config ({exc}).") from exc


def load_encoder(path: str | Path, device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                 config: Optional[EncoderConfig] = None) -> tuple[DiekaeEncoder, dict[str, torch.Tensor]]:
    """Load encoders from ``path``; returns the module and any extra tensors stored beside it.
    ``config``: the checkpoint's, when :func:`read_checkpoint` has read it already."""
    config = config or read_config(path)
    weights = _weights_file(path)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated ({exc}). Restore it or re-save the encoders.") from exc
    state = {FORMAT1_WEIGHTS.get(k, k): v for k, v in state.items()}
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


def check_decoder(config: EncoderConfig, decoder_config, source: str = "") -> None:
    """Refuse a decoder other than the one the encoders were trained for (by its fingerprint)."""
    fp = decoder_fingerprint(decoder_config)
    if config.decoder_fingerprint and config.decoder_fingerprint != fp:
        raise DecoderMismatchError(
            f"The encoders{(' in ' + source) if source else ''} were trained for decoder "
            f"{config.decoder_name!r} (fingerprint {config.decoder_fingerprint}), but the decoder given has "
            f"fingerprint {fp} ({decoder_config.model_type}, hidden {decoder_config.hidden_size}, "
            f"{decoder_config.num_hidden_layers} layers). Load the matching decoder or train new encoders.")


def fresh_encoder(config: Optional[EncoderConfig], decoder, decoder_name: str) -> DiekaeEncoder:
    """Zero-output encoders of ``config``'s shape (the paper's form when None, with a warning that they
    inject nothing) for ``decoder``, on its device and in its dtype."""
    cfg = (config or EncoderConfig()).for_decoder(decoder.config, decoder_name)
    if config is None:
        log.warning("!!! No trained DIEKÆ encoders found: using freshly initialised encoders, which "
                    "inject NOTHING (mode='diekae' answers like mode='none'). Train some with "
                    "`diekae-rag train`.")
    return DiekaeEncoder(cfg).to(device=decoder.device, dtype=decoder.dtype)
