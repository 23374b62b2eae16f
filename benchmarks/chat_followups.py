"""Follow-up questions in a conversation: how much of it the copy's question-aware parts should read.

    python benchmarks/chat_followups.py [CHECKPOINT] --split dev --turns 1 2 3 [--n 60] [--k 3] [--modes ...]
        [--grid FIELD=V1,V2 ...]

On conversations of ``diekae_rag.data.followups`` (turn 1: a fact about an invented subject and its
answer; turn 2: another fact about "that person" / "that place"), answers turn 2 with the whole
conversation in ``none`` / ``in_context`` / ``diekae`` mode, DIEKÆ once per ``question_turns`` value
(how many turns the passage prior, the answer-start reader and the copy gate read; the shipped gate
otherwise). Two sets: the subject's passage holds the follow-up's answer (acc / EM / F1, gated), or
does not (copy rate, gated: the harm side). ``--split dev`` (seed 1001) chooses; ``--split eval``
(seed 2002) is run once for what ships. ``--source squad``: SQuAD follow-ups instead
(``squad_followups``: turn 2 is another question of the same paragraph, or of another paragraph of the
same article, which the passage does not answer; k=1), from the SQuAD-Shifts training files for
``dev`` and from the SQuAD dev file for ``eval``. Single-turn questions read the same text whatever the
setting (``tests/test_gate.py``). ``--grid``: DIEKÆ once more per combination of these ``CopyConfig``
values, for each ``--turns``. Writes benchmarks/results/chat_followups_<split>[_squad].json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.config import parse_grid
from diekae_rag.data.followups import SPLIT_SEEDS, followup_split
from diekae_rag.data.negatives import NegativeItem
from diekae_rag.evaluation import evaluate_items, evaluate_negatives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="dev")
    ap.add_argument("--turns", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--k", type=int, default=3, help="passages per conversation (fictional; SQuAD's have one)")
    ap.add_argument("--source", choices=["fictional", "squad"], default="fictional")
    ap.add_argument("--modes", nargs="+", choices=["none", "in_context", "diekae"], default=["none", "in_context", "diekae"])
    ap.add_argument("--grid", nargs="+", default=[], help="FIELD=V1,V2: CopyConfig values, one DIEKÆ row per combination")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        grid = parse_grid(args.grid)
    except ValueError as exc:
        raise SystemExit(f"--grid: {exc}") from None
    model = DiekaeModel.from_pretrained(args.checkpoint)
    seed = SPLIT_SEEDS[args.split]
    try:
        answering, silent = followup_split(args.source, args.split, args.n, args.k)
    except ValueError as exc:
        raise SystemExit(f"{exc} (--n)") from None
    silent = [NegativeItem(e.question, e.passages, [e.answer]) for e in silent]
    runs = [(mode, None, {}) for mode in ("none", "in_context") if mode in args.modes]
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    runs += [("diekae", t, s) for t in args.turns for s in settings] if "diekae" in args.modes else []
    rows = []
    for mode, turns, setting in runs:
        copy = None if turns is None else {"question_turns": turns, **setting}
        t0 = time.time()
        ans = evaluate_items(model, answering, mode, copy=copy)
        neg = evaluate_negatives(model, silent, mode, copy=copy)
        row = {"mode": mode, "question_turns": turns, **({"setting": setting} if setting else {}),
               "answering": {m: round(ans[m], 4) for m in ("acc", "em", "f1", "copy", "gated", "len")},
               "not_answering": {m: round(neg[m], 4) for m in ("acc", "copy", "gated", "len")},
               "seconds": round(time.time() - t0, 1),
               "examples": [{k: r[k] for k in ("gold", "output")} for r in ans["records"][:3]]}
        rows.append(row)
        a, b = row["answering"], row["not_answering"]
        print(f"{mode:10s} turns {turns or '-'} {setting or ''}: acc {a['acc']:.2f} EM {a['em']:.2f} F1 {a['f1']:.2f} gated {a['gated']:.2f}"
              f" | not answering: copy {b['copy']:.2f} gated {b['gated']:.2f}", flush=True)
    name = f"chat_followups_{args.split}{'_squad' if args.source == 'squad' else ''}.json"
    out = args.out or Path(__file__).parent / "results" / name
    atomic_write_text(out, json.dumps({"checkpoint": args.checkpoint or "shipped", "split": args.split, "seed": seed,
                                       "source": args.source, "n": args.n, "k": args.k, "copy": model.copy.to_dict(), "rows": rows},
                                      indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
