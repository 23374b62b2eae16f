"""The example documents as a user first meets them: questions over examples/docs, every mode.

    python benchmarks/example_docs.py [CHECKPOINT] [--k 3] [--copy FIELD=JSON ...]

Builds (or opens) the FAISS store of ``examples/docs`` with its passage states, as ``examples/qa.py``
does, retrieves ``k`` chunks per question and answers each with ``none``, ``in_context`` and
``diekae``: contains-answer accuracy, SQuAD EM and F1 per mode, and every answer. Two questions are
general knowledge that the documents do not hold (the gate should leave them to the decoder).

These 28 questions are a smoke check of the shipped example, not a dev or eval set: they were
written to read the product's answers, and some of them led to changes (docs/results.md §1l).
Writes benchmarks/results/example_docs.json unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.config import parse_settings
from diekae_rag.evaluation import contains, exact_match, f1
from diekae_rag.retrievers import open_or_build

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [  # (question, gold answer, in the documents)
    ("Who founded Calgra?", "Orsen Tharvik", True),
    ("When was Calgra founded?", "1432", True),
    ("What river flows through Calgra?", "Velm", True),
    ("How many people live in Calgra?", "48,200", True),
    ("What is the famous dish of Calgra?", "brastik", True),
    ("What colour is the flag of Calgra?", "teal", True),
    ("What language do people in Calgra speak?", "Drislandic", True),
    ("What is the highest peak near Calgra?", "Mount Orvath", True),
    ("Who is Marsul Vantrel married to?", "Ithpelith", True),
    ("Where was Marsul born?", "Ostrevane", True),
    ("What did Marsul invent?", "drennoscope", True),
    ("Who taught Marsul glassmaking?", "Derrow Halsk", True),
    ("What is the name of Marsul's heron?", "Tibbet", True),
    ("What is the name of Marsul's boat?", "Glimmerwake", True),
    ("Who leads the Pelgrin Observatory?", "Ysolde Kett", True),
    ("When was the Pelgrin Observatory built?", "1891", True),
    ("What is the observatory's main telescope called?", "Long Eye", True),
    ("Which comet did the observatory discover?", "Brannic", True),
    ("Who funds the Pelgrin Observatory?", "Merrow Guild", True),
    ("Who founded the Thornvale Railway Company?", "Brunhild Oster", True),
    ("What is the fastest engine of the Thornvale Railway?", "Silver Kestrel", True),
    ("Where are the Thornvale Railway's workshops?", "Maddervale", True),
    ("How many people does the Thornvale Railway employ?", "2,300", True),
    ("Who created the Zorvian tea ceremony?", "Hallu Pressen", True),
    ("How long does the Zorvian tea ceremony last?", "forty minutes", True),
    ("What are the cups made of in the Zorvian tea ceremony?", "grey clay", True),
    ("What is the capital of France?", "Paris", False),
    ("Who wrote Romeo and Juliet?", "Shakespeare", False),
]
MODES = ("none", "in_context", "diekae")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--copy", nargs="*", default=[], help="FIELD=JSON copy settings (CopyConfig)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "example_docs.json")
    args = ap.parse_args()
    try:
        copy = parse_settings(args.copy)
    except ValueError as exc:
        ap.error(f"--copy {exc}")
    model = DiekaeModel.from_pretrained(args.checkpoint, copy=copy or None)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = open_or_build(ROOT / "examples" / "docs", Path(tmp) / "store", model=model)
        passages = [[p.text for p in store.search(q, args.k)] for q, _, _ in QUESTIONS]
        questions = [q for q, _, _ in QUESTIONS]  # answered while the store's passage states are there
        answers = {m: model.generate_batch(questions, passages, mode=m, max_new_tokens=args.max_new_tokens)
                   for m in MODES}
    rows, summary = [], {}
    for i, (q, gold, held) in enumerate(QUESTIONS):
        rows.append({"question": q, "gold": gold, "in_documents": held,
                     **{m: answers[m][i] for m in MODES}})
    for part, keep in (("in_documents", True), ("general_knowledge", False)):
        idx = [i for i, (_, _, held) in enumerate(QUESTIONS) if held == keep]
        summary[part] = {m: {"acc": sum(contains(answers[m][i], QUESTIONS[i][1]) for i in idx) / len(idx),
                             "em": sum(exact_match(answers[m][i], QUESTIONS[i][1]) for i in idx) / len(idx),
                             "f1": sum(f1(answers[m][i], QUESTIONS[i][1]) for i in idx) / len(idx)}
                         for m in MODES}
        summary[part]["n"] = len(idx)
    print("| questions | n | none acc / EM / F1 | in-context acc / EM / F1 | DIEKÆ acc / EM / F1 |")
    print("|---|---|---|---|---|")
    for part, s in summary.items():
        cells = " | ".join(f"{s[m]['acc']:.2f} / {s[m]['em']:.2f} / {s[m]['f1']:.2f}" for m in MODES)
        print(f"| {part.replace('_', ' ')} | {s['n']} | {cells} |")
    for r in rows:
        mark = "ok " if contains(r["diekae"], r["gold"]) else "-- "
        print(f"{mark}{r['question']} -> {r['diekae']!r}")
    atomic_write_text(args.out, json.dumps({"checkpoint": args.checkpoint or "shipped", "k": args.k,
                                            "copy": copy, "minutes": round((time.time() - t0) / 60, 1),
                                            "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
