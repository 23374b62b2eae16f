"""Where the pointer looks when it must choose an answer: its attention at the answer's first token.

    python benchmarks/research/pointer_attention.py [CHECKPOINT] --k 1 5

On 48 fictional items built like training data but from another seed (not the eval sets;
the same items as ``match_probe.py``), teacher-forced, for the position that predicts the
answer's first token: how often the decoder's top token is the gold one (by match class, so
" Ith" and "Ith" count alike), how often the pointer's most-attended knowledge token is, and
the attention mass (mean over heads) on knowledge tokens of the gold first token's class.
Writes benchmarks/results/pointer_attention.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec


def first_token_stats(model: DiekaeModel, items) -> dict:
    classes = model.knowledge.classes
    n = pred_ok = top_ok = 0
    mass = 0.0
    for it in items:
        prompts, passages = model.prepare([it.question], [it.passages], "diekae")
        answer = model.prompter.answer_ids(it.answer, True)
        with torch.no_grad():
            logits, targets = model.answer_logits(prompts, passages, [answer])
        readout = model.inspect(it.question, it.passages, it.answer).readout
        attn = readout.attention[0]                    # (heads, T, slots): question tail + answer
        q = attn.shape[1] - len(answer) - 1            # the position that predicts the first token
        # The slots whose token is of the gold token's class (whatever form their value rows take).
        gold = classes[readout.memory.ids[0]] == classes[targets[0]]
        at = attn[:, q]
        n += 1
        pred_ok += int(classes[logits[0].argmax()] == classes[targets[0]])
        top_ok += int(gold[at.sum(0).argmax()])
        mass += float((at * gold).sum(-1).mean())
    return {"n": n, "first_token_right": pred_ok / n, "pointer_top_is_gold": top_ok / n, "gold_mass": mass / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "pointer_attention.json")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if model.config.pointer_layer is None or not model.config.per_step:
        raise SystemExit("These encoders have no per-step pointer readout; nothing to look at.")
    rows = []
    for k in args.k:
        row = {"k": k, **first_token_stats(model, DataSpec(fictional=args.n, k=k, seed=999).build())}
        print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        rows.append(row)
    atomic_write_text(args.out, json.dumps({"checkpoint": args.checkpoint or "shipped", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
