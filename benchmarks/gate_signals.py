"""The copy gate's signals on dev items: how well they keep answerable items and gate the rest.

    python benchmarks/gate_signals.py [CHECKPOINT] [--n 60] [--reader DIR]
    python benchmarks/gate_signals.py --match REFERENCE.json OTHER.json [...] --at 0.7

For dev items that hold the answer (fictional and SQuAD-Shifts *train* items, seed 999, at k=1 and
at k=5 with retrieved distractors) and dev items that do not (``closed_book`` dev, ``unanswerable``
dev), it records the best question-passage MiniLM cosine, the answer-start reader's P(no answer)
with one "no answer" slot and with one per window (``CopyConfig.gate_nulls``), and its null margin
(log P(no answer) - the best start's log P, SQuAD 2.0's no-answer rule), then, for a grid of
thresholds, the share of answerable items kept and of the others gated, and for each reader signal
alone, the most it gates while every SQuAD-Shifts set keeps a given share. ``--match`` reads files
it wrote and, for each other reader, finds the threshold on ``no_answer_every`` at which each
SQuAD-Shifts set keeps as large a share as the reference's reader keeps at ``--at``, and what it gates.
Never the eval sets. Writes benchmarks/results/gate_signals.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.mixture import DataSpec
from diekae_rag.data.negatives import closed_book, unanswerable

COSINES = (0.0, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
NO_ANSWER = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


def signals(model: DiekaeModel, items) -> dict[str, list[float]]:
    qs, ps = [it.question for it in items], [list(it.passages) for it in items]
    best = [float(c.max()) for c in model.passage_prior.cosines(qs, ps)]
    null, every, margin = [], [], []
    for q, p in zip(qs, ps):
        starts = model.answer_reader.char_log_probs(q, p)
        lp_null = model.answer_reader.no_answer_log_prob(q, p)
        null.append(math.exp(lp_null))
        every.append(math.exp(model.answer_reader.no_answer_log_prob(q, p, nulls="every")))
        margin.append(lp_null - max((v for s in starts for v in s.values()), default=-math.inf))
    return {"cosine": best, "no_answer": null, "no_answer_every": every, "null_margin": margin}


def dev_items(n: int) -> tuple[dict, dict]:
    """The gate's dev items: answerable ones (fictional and SQuAD-Shifts train, seed 999, at k=1 and at
    k=5 with retrieved distractors) and the dev halves of the negative sets, ``n`` per set."""
    answerable = {
        "fictional_k1": DataSpec(fictional=n, k=1, seed=999).build(),
        "fictional_k5_retrieved": DataSpec(fictional=n, k=5, seed=999, distractors="retrieved").build(),
        "squad_train_k1": DataSpec(fictional=0, squad=n, k=1, seed=999).build(),
        "squad_train_k5_retrieved": DataSpec(fictional=0, squad=n, k=5, seed=999, distractors="retrieved").build(),
    }
    return answerable, {"closed_book_dev": closed_book("dev"), "unanswerable_dev": unanswerable("dev", n)}


def operating_points(sig: dict, keep: Sequence[float] = (0.95, 0.92, 0.9, 0.85),
                     signals: Sequence[str] = ("no_answer", "no_answer_every", "null_margin")) -> list[dict]:
    """For each reader signal alone: at each share of answerable SQuAD-Shifts items to keep (at k=1
    and k=5), the threshold that gates the most negative dev items, and what it gates."""
    squad = [name for name in sig if name.startswith("squad")]
    negative = [name for name in sig if name.endswith("_dev")]
    out = []
    for signal in signals:
        values = sorted({v for s in sig.values() for v in s[signal]})
        for share in keep:
            best = None
            for t in values:  # gate where the signal exceeds t
                kept = min(float(np.mean([v <= t for v in sig[n][signal]])) for n in squad)
                gated = {n: float(np.mean([v > t for v in sig[n][signal]])) for n in negative}
                if kept >= share and (best is None or sum(gated.values()) > sum(best["gated"].values())):
                    best = {"signal": signal, "keep": share, "threshold": t, "kept": kept, "gated": gated}
            if best is not None:
                out.append({**best, "gated": {n: round(v, 3) for n, v in best["gated"].items()},
                            "kept": round(best["kept"], 3), "threshold": round(best["threshold"], 4)})
    return out


def matched_point(sig: dict, reference: dict, at: float, signal: str = "no_answer_every") -> dict:
    """The lowest threshold on ``signal`` at which each SQuAD-Shifts set of ``sig`` keeps at least
    the share that ``reference`` keeps at ``at``, with what it keeps and gates there."""
    squad = [name for name in sig if name.startswith("squad")]
    target = {n: float(np.mean([v <= at for v in reference[n][signal]])) for n in squad}
    for t in sorted({v for n in squad for v in sig[n][signal]}):
        kept = {n: float(np.mean([v <= t for v in sig[n][signal]])) for n in squad}
        if all(kept[n] >= target[n] for n in squad):
            gated = {n: round(float(np.mean([v > t for v in s[signal]])), 3) for n, s in sig.items() if n.endswith("_dev")}
            return {"threshold": round(t, 4), "kept": {n: round(v, 3) for n, v in kept.items()}, "gated": gated}
    raise ValueError("no threshold keeps the reference's shares")


def match(reference: Path, at: float, others: Sequence[Path]) -> None:
    ref = json.loads(reference.read_text())["signals"]
    for path in [reference, *others]:
        point = matched_point(json.loads(path.read_text())["signals"], ref, at)
        print(json.dumps({"file": str(path), **point}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--reader", default=None, help="an answer-start reader folder to read in place of the checkpoint's")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gate_signals.json")
    ap.add_argument("--match", type=Path, nargs="+", default=None,
                    help="files this script wrote: the reference, then the readers to compare with it")
    ap.add_argument("--at", type=float, default=0.7, help="the reference's threshold for --match")
    args = ap.parse_args()
    if args.match:
        return match(args.match[0], args.at, args.match[1:])
    model = DiekaeModel.from_pretrained(args.checkpoint)
    if args.reader:
        from diekae_rag.answer_reader import AnswerStartReader
        model.answer_reader = AnswerStartReader.from_pretrained(args.reader)
    n = args.n
    answerable, negative = dev_items(n)
    sig = {name: signals(model, items) for name, items in {**answerable, **negative}.items()}
    grid = []
    for c in COSINES:
        for a in NO_ANSWER:
            row = {"gate_cosine": c, "gate_no_answer": a}
            for name, s in sig.items():
                open_ = [x >= c and y <= a for x, y in zip(s["cosine"], s["no_answer"])]
                row[f"{'kept' if name in answerable else 'gated'}:{name}"] = round(
                    float(np.mean(open_ if name in answerable else [not o for o in open_])), 3)
            grid.append(row)
    medians = {name: {k: round(float(np.median(v)), 3) for k, v in s.items()} for name, s in sig.items()}
    print(json.dumps(medians, indent=1))
    for row in grid:
        print(json.dumps(row))
    points = operating_points(sig)
    for row in points:
        print(json.dumps(row))
    atomic_write_text(args.out, json.dumps({"checkpoint": args.checkpoint or "shipped", "reader": args.reader,
                                            "n": n, "medians": medians, "grid": grid,
                                            "operating_points": points, "signals": sig}, indent=1))
    plot(sig, answerable, args.out.with_suffix(".png"))


def plot(sig: dict, answerable: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, s in sig.items():
        ax.scatter(s["cosine"], s["no_answer"], s=12, alpha=0.7, marker="o" if name in answerable else "x", label=name)
    ax.set_xlabel("best question-passage cosine (MiniLM)")
    ax.set_ylabel("reader P(no answer)")
    ax.set_title("Copy gate signals on dev items (o: answerable, x: not)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
