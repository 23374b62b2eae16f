"""Injection through forward hooks on a frozen decoder's MLP modules.

The hooks are installed once per decoder and are inert unless an :class:`Injection` is
active *in the calling context* (a ``ContextVar``), so concurrent calls in different threads
never see each other's rows, and an exception inside a call leaves nothing behind.

A pre-hook on the decoder's ``forward`` tells the injection which step it is at: the first
forward of a call is the prefill (rows aligned to the prompt's positions); later forwards are
KV-cached decode steps, which get rows only in per-step mode.

Compiled decode steps (:func:`compiled_steps`, used by ``DiekaeModel.compile_decode``): a
``torch.compile``d decoder cannot read a ``ContextVar``, so inside a compiled graph every MLP
hook adds its layer's slice of one fixed buffer instead. The pre-hook stays outside the graph
(``torch.compiler.disable``): it runs the encoders' step eagerly and writes their rows (or zeros)
into that buffer before the layers run. The prefill is not compiled and reads the injection as
an eager call does.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch import nn

from .decoder import static_cache_kwargs
from .encoder import DiekaeEncoder, EncoderCache

if TYPE_CHECKING:
    from .copy import CopyReadout

_ACTIVE: ContextVar[Optional["Injection"]] = ContextVar("diekae_active_injection", default=None)
_COMPILED: ContextVar[bool] = ContextVar("diekae_compiled_steps", default=False)  # this call's steps are compiled


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of an HF LLaMA-family causal LM (Llama, Mistral, Qwen2, ...)."""
    base = decoder.get_decoder() if hasattr(decoder, "get_decoder") else getattr(decoder, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or len(layers) == 0 or not hasattr(layers[0], "mlp"):
        raise TypeError(f"{type(decoder).__name__} is not a LLaMA-family decoder with `.model.layers[i].mlp`; "
                        "diekae-rag supports Llama, Mistral, Qwen2 and similar architectures.")
    return layers


@dataclass
class EncoderSession:
    """One encoder's state for one call: its cache, its copy readout, and how its rows map onto
    decoder positions."""

    encoder: DiekaeEncoder
    cache: Optional[EncoderCache]
    layer_rows: dict[int, torch.Tensor]   # decoder layer -> (B, T_dec, hidden) for the prefill
    per_step: bool
    active: Optional[torch.Tensor] = None  # (B,) float: each item's scale (0: no knowledge)
    readout: Optional["CopyReadout"] = None

    def step(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Rows for one KV-cached decode step (only in per-step mode)."""
        if not self.per_step or self.cache is None:
            return {}
        out = self.encoder(input_ids, torch.ones_like(input_ids, dtype=torch.bool), cache=self.cache, use_cache=True)
        self.cache = out.cache
        pointer = self.readout(out.states, input_ids) if self.readout is not None else None
        rows = layer_rows_from(self.encoder.config, out.rows, pointer)
        if self.active is not None:
            keep = self.active[:, None, None]
            rows = {layer: r * keep.to(r.dtype) for layer, r in rows.items()}
        return rows


def layer_rows_from(cfg, rows: Optional[torch.Tensor], pointer: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Map the encoders' stacked rows and the copy rows to ``{decoder layer: (B, T, hidden)}``."""
    out: dict[int, torch.Tensor] = {}
    if rows is not None:
        for i, layer in enumerate(cfg.layers):
            out[layer] = rows[i]
    if pointer is not None:
        layer = cfg.pointer_layer
        out[layer] = out[layer] + pointer if layer in out else pointer
    return out


def align_rows(rows: dict[int, torch.Tensor], enc_offset: torch.Tensor, n_rows: torch.Tensor,
               decoder_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Gather encoder rows onto decoder positions.

    Item b's k-th real decoder token (whatever the padding side) takes encoder row
    ``enc_offset[b] + k`` if ``k < n_rows[b]``, and nothing otherwise.
    """
    k = decoder_mask.long().cumsum(1) - 1                                   # (B, T_dec)
    valid = decoder_mask.bool() & (k < n_rows[:, None]) & (k >= 0)
    out = {}
    for layer, r in rows.items():
        idx = (enc_offset[:, None] + k).clamp(0, r.shape[1] - 1)
        g = torch.gather(r, 1, idx[..., None].expand(-1, -1, r.shape[-1]))
        out[layer] = g * valid[..., None].to(g.dtype)
    return out


class Injection:
    """What to add to which MLP outputs during one call (prefill, then decode steps)."""

    def __init__(self, decoder: nn.Module, sessions: Sequence[EncoderSession]) -> None:
        self.decoder = decoder
        self.sessions = list(sessions)
        self.forwards = 0
        self.current: dict[int, torch.Tensor] = {}

    def on_forward(self, input_ids: Optional[torch.Tensor]) -> None:
        self.forwards += 1
        if self.forwards == 1:
            self.current = _sum_rows([s.layer_rows for s in self.sessions])
            T = input_ids.shape[1] if input_ids is not None else None
            for r in self.current.values():
                if T is not None and r.shape[1] != T:
                    raise RuntimeError(f"Injection rows cover {r.shape[1]} positions but the decoder got {T}; "
                                       "build the injection from the same prompt the decoder reads.")
        else:
            if input_ids is None:
                raise RuntimeError("Per-step injection needs `input_ids` in decode steps.")
            self.current = _sum_rows([s.step(input_ids) for s in self.sessions])

    def delta(self, layer: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows to add to ``layer``'s MLP output ``like`` at this step, if any."""
        r = self.current.get(layer)
        if r is None:
            return None
        if r.shape[:2] != like.shape[:2]:
            raise RuntimeError(f"Injection rows {tuple(r.shape)} do not fit MLP output {tuple(like.shape)} "
                               "(beam search and multiple return sequences are not supported with injection).")
        return r.to(like.dtype)


def _sum_rows(parts: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for p in parts:
        for layer, r in p.items():
            out[layer] = out[layer] + r if layer in out else r
    return out


class _Hooks:
    """The hooks on one decoder. Eager calls read the active :class:`Injection`; a compiled decode
    step (:func:`compiled_steps`) reads :attr:`step_rows` instead, a fixed buffer that the
    (never compiled) pre-hook fills before the decoder's layers run."""

    def __init__(self, decoder: nn.Module) -> None:
        self.handles = []
        self.step_rows: Optional[torch.Tensor] = None  # (layers, B, 1, hidden): what compiled steps add
        self.lock = threading.Lock()                   # one compiled call at a time: they share step_rows
        for i, layer in enumerate(decoder_layers(decoder)):
            self.handles.append(layer.mlp.register_forward_hook(self._mlp_hook(decoder, i)))
        base = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
        self.handles.append(base.register_forward_pre_hook(self._pre_hook(decoder), with_kwargs=True))

    def _mlp_hook(self, decoder: nn.Module, index: int):
        def hook(module, args, output):
            # True only inside dynamo's trace (is_compiling() is a process-wide flag, also True in
            # another thread's eager call while one thread compiles)
            if torch.compiler.is_dynamo_compiling() and self.step_rows is not None:
                return output + self.step_rows[index].to(output.dtype)
            inj = _ACTIVE.get()
            if inj is None or inj.decoder is not decoder:
                return None
            delta = inj.delta(index, output)
            return None if delta is None else output + delta
        return hook

    def _pre_hook(self, decoder: nn.Module):
        @torch.compiler.disable
        def hook(module, args, kwargs):
            inj = _ACTIVE.get()
            ids = kwargs.get("input_ids", args[0] if args else None)
            mine = inj is not None and inj.decoder is decoder
            if mine:
                inj.on_forward(ids)
            if _COMPILED.get():  # what the compiled graph adds at this step (the prefill is eager)
                self.step_rows.zero_()
                if mine and inj.forwards > 1:
                    for layer, r in inj.current.items():
                        self.step_rows[layer].copy_(r)
            return None
        return hook


@contextlib.contextmanager
def compiled_steps(decoder: nn.Module, batch_size: int) -> Iterator[None]:
    """Run the block's decode steps through the compiled hooks' buffer (one block at a time per
    decoder). The buffer is kept between calls, so that a compiled graph is reused; a new batch
    size gets a new buffer (and a new graph)."""
    install_hooks(decoder)
    hooks: _Hooks = decoder._diekae_hooks
    with hooks.lock:
        shape = (len(decoder_layers(decoder)), batch_size, 1, decoder.config.hidden_size)
        if hooks.step_rows is None or tuple(hooks.step_rows.shape) != shape:
            hooks.step_rows = torch.zeros(shape, device=decoder.device, dtype=decoder.dtype)
        token = _COMPILED.set(True)  # this context's calls only: an eager call elsewhere leaves the buffer alone
        try:
            yield
        finally:
            _COMPILED.reset(token)


def thread_safe_kernel_funcs() -> None:
    """Let eager decoder calls run beside another thread's ``torch.compile``.

    transformers' attention layers route through the ``kernels`` package's ``use_kernelized_func``,
    whose context variable falls back to one shared global while ``torch.compiler.is_compiling()``
    is true; that flag is process-wide, so an eager call in another thread took the fallback too,
    and a reset could then meet the other path's token (``TypeError: expected an instance of
    Token``). Here the fallback is taken only inside dynamo's own trace (``is_dynamo_compiling``,
    as our MLP hooks do), and a reset follows the token it is given. Idempotent; a no-op without
    ``kernels`` or where its variable has another shape."""
    try:
        from kernels import use_kernelized_func
    except ImportError:
        return
    var = getattr(use_kernelized_func, "__globals__", {}).get("_ACTIVE_KERNEL_FUNCS")
    if var is None or isinstance(var, _ThreadSafeFallback):
        return
    if not all(hasattr(var, a) for a in ("context_var", "global_var", "uses_global_var", "get", "set", "reset")):
        return
    var.__class__ = type("ThreadSafe" + type(var).__name__, (_ThreadSafeFallback, type(var)), {})


class _ThreadSafeFallback:
    """``kernels``' CompileableContextVar with its global fallback taken only inside dynamo's trace
    (and, after a graph break, where the traced part left it set)."""

    def get(self):
        if torch.compiler.is_dynamo_compiling() or self.uses_global_var:
            return self.global_var
        return self.context_var.get()

    def set(self, value):
        if torch.compiler.is_dynamo_compiling():
            previous, self.global_var, self.uses_global_var = self.global_var, value, True
            return previous
        return self.context_var.set(value)

    def reset(self, token):
        if not torch.compiler.is_dynamo_compiling() and isinstance(token, Token):
            self.context_var.reset(token)
        else:
            self.global_var, self.uses_global_var = token, token is not None


def install_hooks(decoder: nn.Module) -> None:
    """Install the (inert) injection hooks on ``decoder`` once; safe to call repeatedly."""
    if getattr(decoder, "_diekae_hooks", None) is None:
        decoder._diekae_hooks = _Hooks(decoder)


def remove_hooks(decoder: nn.Module) -> None:
    hooks = getattr(decoder, "_diekae_hooks", None)
    if hooks is not None:
        for h in hooks.handles:
            h.remove()
        decoder._diekae_hooks = None


@contextlib.contextmanager
def injecting(injection: Optional[Injection]) -> Iterator[Optional[Injection]]:
    """Make ``injection`` active for decoder calls in this context only."""
    if injection is not None:
        install_hooks(injection.decoder)
    token = _ACTIVE.set(injection)
    try:
        yield injection
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def capturing_mlp_outputs(decoder: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the MLP outputs (after any injection) of ``layers`` during the block's calls."""
    store: dict[int, torch.Tensor] = {}
    mods = decoder_layers(decoder)
    handles = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            store[layer] = output.detach()
        handles.append(mods[layer].mlp.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def decode_steps(decoder: nn.Module, cfg, cache_block: int, ids: torch.Tensor, max_new_tokens: int, gen_kwargs: dict):
    """The context of one generate call: compiled decode steps (adding their settings to ``gen_kwargs``)
    where ``cfg`` (:func:`diekae_rag.decoder.decode_compile_config`) is set, else nothing."""
    if cfg is None:
        return contextlib.nullcontext()
    gen_kwargs.update(static_cache_kwargs(cfg, ids.shape[1] + max_new_tokens, cache_block))
    return compiled_steps(decoder, ids.shape[0])
