"""Trace a copy: for eval items, teacher-forced, what the pointer attends to at each answer token.

    python benchmarks/research/copy_trace.py [CHECKPOINT] --items 34 44 --set squad_dev --k 1 \
        [--setting pointer_continue_bonus=0]

For each item (by index in ``diekae-rag eval``'s set of the same --n, --k and --distractors) and each
gold answer token: the decoder's probability of it, its top token, and the pointer's three
most-attended slots (mean over heads, with the token each writes); then the greedy answer. This is
how a wrong answer is read: the copy started elsewhere, or left its occurrence, or stopped.
Writes JSON to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.config import parse_settings
from diekae_rag.evaluation import eval_sets


def trace(model: DiekaeModel, item) -> dict:
    tok = model.tokenizer
    prompts, passages = model.prepare([item.question], [item.passages], "diekae")
    answer = model.prompter.answer_ids(item.answer, True)
    with torch.no_grad():
        logits, _ = model.answer_logits(prompts, passages, [answer])
    readout = model.inspect(item.question, item.passages, item.answer).readout
    attn = readout.attention[0].mean(0)                      # (T, slots)
    slot_ids = readout.memory.ids[0]
    q0 = attn.shape[0] - len(answer) - 1                     # the position that predicts the first token
    steps = []
    for j, t in enumerate(answer):
        top = attn[q0 + j].topk(3)
        p = torch.softmax(logits[j], -1)
        steps.append({"token": tok.decode([t]), "p": round(float(p[t]), 3), "top": tok.decode([int(p.argmax())]),
                      "pointer": [[tok.decode([int(slot_ids[s])]), round(float(v), 3)]
                                  for v, s in zip(top.values, top.indices)]})
    return {"question": item.question, "gold": item.answer, "steps": steps,
            "greedy": model.generate(item.question, item.passages, max_new_tokens=24)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--items", type=int, nargs="+", required=True)
    ap.add_argument("--set", default="squad_dev", choices=["fictional_seen", "fictional_unseen", "squad_dev"])
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--distractors", default="random", choices=["random", "retrieved"])
    ap.add_argument("--setting", nargs="*", default=[], help="FIELD=JSON copy settings (CopyConfig)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        settings = parse_settings(args.setting)
    except ValueError as exc:
        ap.error(f"--setting {exc}")
    model = DiekaeModel.from_pretrained(args.checkpoint, copy=settings)
    items = eval_sets(n=args.n, k=args.k, squad=args.set == "squad_dev", distractors=args.distractors)[args.set]
    rows = []
    for i in args.items:
        row = {"item": i, **trace(model, items[i])}
        rows.append(row)
        print(f"=== {i}: {row['question']} | gold: {row['gold']}")
        for s in row["steps"]:
            print(f"  {s['token']!r:14} p={s['p']:.2f} top={s['top']!r:14} pointer " +
                  ", ".join(f"{t!r}:{v:.2f}" for t, v in s["pointer"]))
        print(f"  greedy: {row['greedy']!r}", flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps({"checkpoint": args.checkpoint or "shipped", "set": args.set,
                                                "k": args.k, "setting": args.setting, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
