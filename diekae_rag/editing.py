"""Knowledge editing with DIEKÆ encoders (the "E" of DIEKÆ).

Editing encoders read only the prompt (no knowledge) and are trained with the LM loss so that
the frozen decoder gives the new object for the edited prompts, plus a KL term that keeps its
next-token distribution unchanged on retain prompts. They attach and detach without touching
the decoder's weights, and stack with the augmentation encoders (rows are summed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_encoder, save_encoder
from .config import DiekaeConfig
from .data.edits import read_jsonl
from .encoder import DiekaeEncoder
from .injection import injecting
from .model import DiekaeModel, fresh_config
from .training.phase2 import answer_logits

EDIT_KEYS = ("subject", "prompt", "target_old", "target_new")


def edit_config(model: DiekaeModel, layers: Sequence[int] = (3, 4, 5, 6, 7, 8)) -> DiekaeConfig:
    """Prompt-only encoders: no knowledge template, rows at the prompt's positions."""
    base = DiekaeConfig(layers=list(layers), n_blocks=2, knowledge_prefix="", knowledge_suffix="",
                        system_prompt=model.config.system_prompt)
    return fresh_config(base, model.decoder, model.config.decoder_name)


def _retain_kl(model: DiekaeModel, prompts: list[list[int]]) -> torch.Tensor:
    """KL(edited || original) of the next-token distribution at the end of each retain prompt."""
    ids, mask = model.prompter.pad(prompts, model.device, side="left")
    with torch.no_grad():
        ref = model.decoder(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
    inj = model.build_injection(prompts, [[] for _ in prompts], mask)
    with injecting(inj):
        new = model.decoder(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
    return F.kl_div(F.log_softmax(new, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")


def train_edit_encoder(model: DiekaeModel, edits: Sequence[dict], retain: Sequence[str] = (), steps: int = 300,
                       lr: float = 2e-3, batch_size: int = 16, retain_weight: float = 1.0, seed: int = 0,
                       progress: bool = True) -> DiekaeEncoder:
    """Train one editing encoder for all ``edits``; the decoder is never modified."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    enc = DiekaeEncoder(edit_config(model)).to(model.device).attach(model.decoder).float().train()
    saved = model.edit_encoders
    model.edit_encoders = [enc]
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, betas=(0.9, 0.95))
    pairs = [(e["prompt"], e["target_new"]) for e in edits]
    retain_ids = [model.prompter.prompt_ids(q) for q in retain]
    try:
        for step in tqdm(range(steps), desc="training edit encoder", disable=not progress):
            batch = rng.sample(pairs, min(batch_size, len(pairs)))
            prompts = [model.prompter.prompt_ids(q) for q, _ in batch]
            answers = [model.prompter.answer_ids(a) for _, a in batch]
            logits, targets = answer_logits(model, prompts, [[] for _ in batch], answers, mode="none")
            loss = F.cross_entropy(logits, targets)
            if retain_ids:
                loss = loss + retain_weight * _retain_kl(model, rng.sample(retain_ids, min(batch_size, len(retain_ids))))
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 20)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.edit_encoders = saved
    return enc.eval()


def apply_edits(model: DiekaeModel, edits: Sequence[dict] | str | Path | DiekaeEncoder, **train_kwargs
                ) -> DiekaeEncoder:
    """Attach editing encoders: train them from edit dicts, or load a saved folder, or use one given."""
    if isinstance(edits, DiekaeEncoder):
        enc = edits
    elif isinstance(edits, (str, Path)) and Path(edits).is_dir():
        enc, _ = load_encoder(edits, model.device, model.decoder.dtype)
        if enc.config.decoder_fingerprint != model.config.decoder_fingerprint:
            raise ValueError(f"The edit encoders in {edits} were made for another decoder.")
    else:
        rows = read_jsonl(edits, EDIT_KEYS) if isinstance(edits, (str, Path)) else list(edits)
        enc = train_edit_encoder(model, rows, **train_kwargs)
    enc.to(device=model.device, dtype=model.decoder.dtype).attach(model.decoder).eval()
    model.edit_encoders = model.edit_encoders + [enc]
    return enc


def _pref(model: DiekaeModel, prompts: list[str], better: list[str], worse: list[str], mode: str = "none",
          knowledge: Optional[list] = None) -> float:
    if not prompts:
        return float("nan")
    a = model.score_batch(prompts, better, knowledge, mode=mode)
    b = model.score_batch(prompts, worse, knowledge, mode=mode)
    return sum(x < y for x, y in zip(a, b)) / len(prompts)


def evaluate_edits(model: DiekaeModel, edits: Sequence[dict], mode: str = "none", as_knowledge: bool = False) -> dict:
    """CounterFact metrics: efficacy and paraphrase (P(new) > P(old)), neighbourhood (P(true) > P(new))."""
    def knowledge(e, n):
        fact = f"{e['prompt'].rstrip('?')}? {e['target_new']}." if "?" in e["prompt"] else f"{e['prompt']} {e['target_new']}."
        return [[fact]] * n if as_knowledge else None

    eff, para, neigh = [], [], []
    for e in edits:
        eff.append(_pref(model, [e["prompt"]], [e["target_new"]], [e["target_old"]], mode, knowledge(e, 1)))
        ps = e.get("paraphrases") or []
        if ps:
            para.append(_pref(model, ps, [e["target_new"]] * len(ps), [e["target_old"]] * len(ps), mode,
                              knowledge(e, len(ps))))
        nb = e.get("neighborhood") or []
        if nb:
            prompts = [n["prompt"] if isinstance(n, dict) else n for n in nb]
            truth = [n["target"] if isinstance(n, dict) else e["target_old"] for n in nb]
            neigh.append(_pref(model, prompts, truth, [e["target_new"]] * len(nb), mode, knowledge(e, len(nb))))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"efficacy": mean(eff), "paraphrase": mean(para), "neighborhood": mean(neigh), "n": len(edits)}


def edit_command(args: argparse.Namespace) -> int:
    """``diekae-rag edit EDITS.jsonl -o DIR``: train editing encoders, save them, print the scores."""
    model = DiekaeModel.from_pretrained()
    edits = read_jsonl(args.edits, EDIT_KEYS)
    retain = [n["prompt"] if isinstance(n, dict) else n for e in edits for n in e.get("retain", [])]
    enc = train_edit_encoder(model, edits, retain=retain, steps=args.steps)
    save_encoder(enc, args.out)
    model.edit_encoders = [enc.eval()]
    print(json.dumps({"saved": str(args.out), "edited": evaluate_edits(model, edits)}, indent=2))
    return 0
