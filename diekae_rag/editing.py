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
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_encoder, save_encoder
from .config import EncoderConfig
from .data.edits import preferences, read_jsonl
from .edit_scope import to_template
from .encoder import DiekaeEncoder
from .injection import injecting
from .model import DiekaeModel

EDIT_KEYS = ("subject", "prompt", "target_old", "target_new")
EDIT_SCOPES = ("fact", "subject", "all")


def edit_config(model: DiekaeModel, layers: Sequence[int] = (3, 4, 5, 6, 7, 8)) -> EncoderConfig:
    """Prompt-only encoders: no knowledge template, rows at the prompt's positions."""
    base = EncoderConfig(layers=list(layers), n_blocks=2, knowledge_prefix="", knowledge_suffix="",
                        system_prompt=model.config.system_prompt)
    return base.for_decoder(model.decoder.config, model.config.decoder_name)


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
                       progress: bool = True, scope: str = "fact") -> DiekaeEncoder:
    """Train one editing encoder for all ``edits``; the decoder is never modified.

    ``scope="fact"`` (default): the encoder acts only on prompts that name an edited subject and
    are worded nearest to one of that subject's edit prompts (among all the edit prompts of the
    set; :mod:`diekae_rag.edit_scope`), so other facts about an edited subject, and prompts about
    anything else, are answered exactly as by the unedited decoder. ``scope="subject"``: every
    prompt naming an edited subject. In both, retain prompts outside the scope are dropped (the
    encoder never acts there). ``scope="all"``: every prompt; locality then has to be learned
    from the retain prompts' KL term.
    """
    if scope not in EDIT_SCOPES:
        raise ValueError(f"scope must be one of {EDIT_SCOPES}, got {scope!r}.")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = edit_config(model)
    if scope != "all":
        templates: dict[str, set[str]] = {}
        for e in edits:
            t = to_template(e["prompt"], e["subject"])
            if t is None:
                raise ValueError(f"Edit prompt {e['prompt']!r} does not name its subject {e['subject']!r}, so a "
                                 f"{scope} scope would never apply it: name the subject in the prompt, or train "
                                 f"with scope='all'.")
            templates.setdefault(e["subject"], set()).add(t)
        cfg.edit_scope = sorted(templates)
        if scope == "fact":
            cfg.edit_templates = {s: sorted(ts) for s, ts in sorted(templates.items())}
    enc = DiekaeEncoder(cfg).to(model.device).attach(model.decoder).float().train()
    saved = model.edit_encoders
    model.edit_encoders = [enc]
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, betas=(0.9, 0.95))
    pairs = [(e["prompt"], e["target_new"]) for e in edits]
    retain_ids = [model.prompter.prompt_ids(q) for q in retain]
    if cfg.edit_scope:  # out-of-scope prompts get no rows: nothing to keep
        retain_ids = [r for r, active in zip(retain_ids, model.in_edit_scope(enc, retain_ids)) if active]
    try:
        for step in tqdm(range(steps), desc="training edit encoder", disable=not progress):
            batch = rng.sample(pairs, min(batch_size, len(pairs)))
            prompts = [model.prompter.prompt_ids(q) for q, _ in batch]
            answers = [model.prompter.answer_ids(a) for _, a in batch]
            logits, targets = model.answer_logits(prompts, [[] for _ in batch], answers, mode="none")
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


def evaluate_edits(model: DiekaeModel, edits: Sequence[dict], mode: str = "none", as_knowledge: bool = False) -> dict:
    """CounterFact metrics: efficacy and paraphrase (P(new) > P(old)), neighbourhood (P(true) > P(new)).

    Each metric is averaged per edit, then over edits. With ``as_knowledge`` the new fact is
    given as a passage (in-context or DIEKÆ knowledge editing, depending on ``mode``).
    """
    rows, owner = {"efficacy": [], "paraphrase": [], "neighborhood": []}, {"efficacy": [], "paraphrase": [],
                                                                           "neighborhood": []}
    for i, e in enumerate(edits):
        fact = [f"{e['prompt'].rstrip('?')}? {e['target_new']}."] if as_knowledge else None
        rows["efficacy"].append((e["prompt"], e["target_new"], e["target_old"], fact))
        owner["efficacy"].append(i)
        for p in e.get("paraphrases") or []:
            rows["paraphrase"].append((p, e["target_new"], e["target_old"], fact))
            owner["paraphrase"].append(i)
        for n in e.get("neighborhood") or []:
            prompt, truth = (n["prompt"], n["target"]) if isinstance(n, dict) else (n, e["target_old"])
            rows["neighborhood"].append((prompt, truth, e["target_new"], fact))
            owner["neighborhood"].append(i)
    result: dict = {"n": len(edits)}
    for metric, items in rows.items():
        if not items:
            result[metric] = None
            continue
        per_edit: dict[int, list[bool]] = {}
        for i, ok in zip(owner[metric], preferences(model, items, mode)):
            per_edit.setdefault(i, []).append(ok)
        result[metric] = sum(sum(v) / len(v) for v in per_edit.values()) / len(per_edit)
    return result


def edit_command(args: argparse.Namespace) -> int:
    """``diekae-rag edit EDITS.jsonl -o DIR``: train editing encoders, save them, print the scores."""
    model = DiekaeModel.from_pretrained()
    edits = read_jsonl(args.edits, EDIT_KEYS)
    retain = [n["prompt"] if isinstance(n, dict) else n for e in edits for n in e.get("retain", [])]
    enc = train_edit_encoder(model, edits, retain=retain, steps=args.steps, scope=args.scope)
    save_encoder(enc, args.out)
    model.edit_encoders = [enc.eval()]
    print(json.dumps({"saved": str(args.out), "edited": evaluate_edits(model, edits)}, indent=2))
    return 0
