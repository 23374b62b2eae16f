"""Knowledge-editing table: unedited decoder, in-context editing, DIEKÆ edit encoders.

    python benchmarks/edit_eval.py [--n 100] [--steps 300] [--scope fact|subject|all] [--retain-weight 1] [--edits EDITS.jsonl] [--encoder DIR]
                                   [--out benchmarks/results/edits]

Builds the edit set from facts the decoder itself states (diekae_rag.data.edits), trains one
editing encoder for all edits (retain prompts keep other answers), and scores efficacy,
paraphrase and neighbourhood with the CounterFact definitions on the same prompts.
"""
import argparse
import json
import time
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.checkpoint import save_encoder
from diekae_rag.data.edits import build_edit_set, read_jsonl, reworded_neighbourhood, write_jsonl
from diekae_rag.editing import EDIT_KEYS, apply_edits, evaluate_edits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--retain-weight", type=float, default=1.0)
    ap.add_argument("--scope", choices=["fact", "subject", "all"], default="fact",
                    help="fact: edits act only on prompts naming an edited subject and worded like its edit; "
                         "subject: on every prompt naming an edited subject; all: on every prompt")
    ap.add_argument("--edits", default=None, help="reuse this edit set instead of building one")
    ap.add_argument("--encoder", default=None, help="score this saved edit encoder instead of training one")
    ap.add_argument("--out", default="benchmarks/results/edits")
    args = ap.parse_args()
    out = Path(args.out)
    model = DiekaeModel.from_pretrained()
    if args.edits:
        edits = read_jsonl(args.edits, EDIT_KEYS)[: args.n]
    else:
        edits = build_edit_set(model, n=args.n)
    write_jsonl(edits, out / "edits.jsonl")
    rows = {"unedited": evaluate_edits(model, edits, mode="none"),
            "in_context (new fact in prompt)": evaluate_edits(model, edits, mode="in_context", as_knowledge=True),
            "diekae knowledge (new fact to augmentation encoders)": evaluate_edits(model, edits, mode="diekae",
                                                                                  as_knowledge=True)}
    reworded = reworded_neighbourhood(edits)
    rows["unedited"]["neighborhood_reworded"] = evaluate_edits(model, reworded)["neighborhood"]
    minutes = None
    if args.encoder:
        enc = apply_edits(model, args.encoder)
    else:
        t0 = time.time()
        enc = apply_edits(model, edits, retain=[r["prompt"] for e in edits for r in e.get("retain", [])],
                                steps=args.steps, retain_weight=args.retain_weight, scope=args.scope)
        minutes = (time.time() - t0) / 60
        save_encoder(enc, out / "edit_encoder")
    rows["diekae edit encoders"] = evaluate_edits(model, edits, mode="none")
    rows["diekae edit encoders"]["neighborhood_reworded"] = evaluate_edits(model, reworded)["neighborhood"]
    model.remove_edits()
    cfg = enc.config
    result = {"n_edits": len(edits), "steps": args.steps if minutes is not None else None,
              "retain_weight": args.retain_weight, "encoder": args.encoder,
              "scope": "all" if not cfg.edit_scope else "fact" if cfg.edit_templates else "subject",
              "train_minutes": minutes, "device": str(model.device), "rows": rows}
    atomic_write_text(out / "edit_results.json", json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
