"""Evaluation behind ``diekae-rag eval``: none / in_context / diekae on the same items.

Metrics per (set, k, mode): answer NLL, preference (NLL(right) < NLL(same-type wrong answer)),
contains-answer accuracy of greedy answers, SQuAD's exact match and token F1 (which, unlike
``contains``, do not reward an answer that runs on past the answer), the copy rate (answers with
three or more consecutive words from the passages), mean answer length; and for DIEKÆ the share
of the in-context gain it recovers, per metric.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from .atomic import atomic_write_text
from .text import normalize
from .data.mixture import Example, eval_sets
from .data.negatives import closed_book, unanswerable
from .model import DiekaeModel

MODES = ("none", "in_context", "diekae")
NEGATIVE_SETS = ("closed_book", "unanswerable")
METRICS = ("nll", "pref", "acc", "em", "f1", "copy", "gated", "len")
NEGATIVE_METRICS = ("acc", "em", "f1", "copy", "abstain", "gated", "len")


def contains(answer: str, gold: str) -> bool:
    return normalize(gold) in normalize(answer)


def squad_normalize(text: str) -> str:
    """SQuAD's official answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(answer: str, gold: str) -> float:
    return float(squad_normalize(answer) == squad_normalize(gold))


def f1(answer: str, gold: str) -> float:
    """SQuAD's token F1 between an answer and the gold answer."""
    pred, ref = squad_normalize(answer).split(), squad_normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def copies(answer: str, passages: Sequence[str], n: int = 3) -> bool:
    """True when ``answer`` has ``n`` or more consecutive words that also occur in a row in a passage."""
    words = normalize(answer).split()
    grams = {" ".join(words[i: i + n]) for i in range(len(words) - n + 1)}
    texts = [f" {normalize(p)} " for p in passages]
    return any(f" {g} " in t for t in texts for g in grams)


def evaluate_items(model: DiekaeModel, items: Sequence[Example], mode: str, batch_size: int = 16,
                   max_new_tokens: int = 24, copy=None) -> dict:
    """Metrics for one mode on ``items`` (and the per-item records); ``copy`` overrides copy settings."""
    records = []
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        qs, ks = [e.question for e in batch], [e.passages for e in batch]
        right = model.score_batch(qs, [e.answer for e in batch], ks, mode=mode, copy=copy)
        wrong = model.score_batch(qs, [e.distractor for e in batch], ks, mode=mode, copy=copy)
        texts = model.generate_batch(qs, ks, mode=mode, max_new_tokens=max_new_tokens, copy=copy)
        for e, r, w, t, g in zip(batch, right, wrong, texts, _gated(model, qs, ks, mode, copy)):
            records.append({"question": e.question, "gold": e.answer, "output": t, "nll": r, "nll_wrong": w,
                            "pref": float(r < w), "acc": float(contains(t, e.answer)),
                            "em": exact_match(t, e.answer), "f1": f1(t, e.answer), "copy": float(copies(t, e.passages)),
                            "gated": g, "len": len(model.tokenizer(t, add_special_tokens=False)["input_ids"])})
    n = max(len(records), 1)
    return {**{m: sum(r[m] for r in records) / n for m in METRICS}, "n": len(records), "records": records}


def _gated(model: DiekaeModel, questions, knowledges, mode: str, copy) -> list[float]:
    """1.0 where the copy gate closes for a diekae call (the items ``on_no_answer="abstain"`` would
    abstain on), else 0.0."""
    if mode != "diekae":
        return [0.0] * len(questions)
    return [float(not g) for g in model.gate(questions, knowledges, copy)]


def evaluate_negatives(model: DiekaeModel, items, mode: str, batch_size: int = 16, max_new_tokens: int = 24,
                       copy=None) -> dict:
    """Metrics for one mode on items whose passages do not answer (:mod:`diekae_rag.data.negatives`):
    accuracy, EM and F1 against any accepted answer, the copy rate and the abstention rate."""
    records = []
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        qs, ks = [e.question for e in batch], [e.passages for e in batch]
        texts = model.generate_batch(qs, ks, mode=mode, max_new_tokens=max_new_tokens, copy=copy)
        for e, t, g in zip(batch, texts, _gated(model, qs, ks, mode, copy)):
            records.append({"question": e.question, "gold": e.answers, "output": t,
                            "acc": float(any(contains(t, a) for a in e.answers)),
                            "em": max(exact_match(t, a) for a in e.answers), "f1": max(f1(t, a) for a in e.answers),
                            "copy": float(copies(t, e.passages)), "abstain": float(t == model.copy.no_answer_text),
                            "gated": g, "len": len(model.tokenizer(t, add_special_tokens=False)["input_ids"])})
    n = max(len(records), 1)
    return {**{m: sum(r[m] for r in records) / n for m in NEGATIVE_METRICS},
            "n": len(records), "records": records}


def recovered(none: float, ctx: float, diekae: float, lower_is_better: bool = False) -> Optional[float]:
    """Share of the in-context gain over no knowledge that DIEKÆ recovers."""
    gain = (none - ctx) if lower_is_better else (ctx - none)
    if abs(gain) < 1e-9:
        return None
    return ((none - diekae) if lower_is_better else (diekae - none)) / gain


def run_eval(checkpoint: Optional[str] = None, n: int = 60, ks: Sequence[int] = (1, 5), out: str = "runs/eval",
             sets: Sequence[str] = ("fictional_seen", "fictional_unseen", "squad_dev"),
             model: Optional[DiekaeModel] = None, other_facts=(0, 0), baseline: Optional[str] = None,
             distractors: str = "random") -> dict:
    """Evaluate on the held-out sets at each k; writes ``results.json`` and ``results.png``.

    ``baseline``: a results.json from a run on the same items (same n, k, sets), whose
    ``none`` and ``in_context`` rows are reused, so only ``diekae`` is evaluated (those two
    modes do not depend on the encoders). ``distractors``: see ``eval_sets``.
    """
    base = json.loads(Path(baseline).read_text()) if baseline else {"n": n, "runs": {}, "distractors": distractors}
    if base["n"] != n or base.get("distractors", "random") != distractors:
        raise ValueError(f"--baseline {baseline} was run with another --n or --distractors; the items must be "
                         "the same.")
    base_runs = base["runs"]
    known = {"fictional_seen", "fictional_unseen", "squad_dev", *NEGATIVE_SETS}
    if set(sets) - known:
        raise ValueError(f"Unknown eval sets {sorted(set(sets) - known)}; choose from {sorted(known)}.")
    model = model or DiekaeModel.from_pretrained(checkpoint)
    torch.manual_seed(0)
    results: dict = {"checkpoint": str(checkpoint or "shipped"), "config": model.config.to_dict(),
                     "device": str(model.device), "n": n, "distractors": distractors, "baseline": baseline, "runs": {}}
    summary = {}
    t0 = time.time()
    for name in [x for x in sets if x in NEGATIVE_SETS]:  # fixed k: closed_book 3, unanswerable 5
        items = closed_book("eval", n) if name == "closed_book" else unanswerable("eval", n)
        key = f"{name}@k={len(items[0].passages)}"
        reuse = ("none", "in_context") if key in base_runs else ()
        res = {m: base_runs[key][m] if m in reuse else evaluate_negatives(model, items, m)
               for m in tqdm(MODES, desc=key)}
        summary[key] = {m: {x: round(res[m][x], 4) for x in NEGATIVE_METRICS if x in res[m]} for m in MODES}
        results["runs"][key] = res
    sets = [x for x in sets if x not in NEGATIVE_SETS]
    for k in ks if sets else ():
        data = eval_sets(n=n, k=k, squad="squad_dev" in sets, other_facts=other_facts, distractors=distractors)
        for name in sets:
            key = f"{name}@k={k}"
            if key in base_runs:
                res = {m: base_runs[key][m] for m in ("none", "in_context")}
                res["diekae"] = evaluate_items(model, data[name], "diekae")
            else:
                res = {m: evaluate_items(model, data[name], m) for m in tqdm(MODES, desc=key)}
            row = {m: {x: round(res[m][x], 4) for x in METRICS if x in res[m]} for m in MODES}
            row["recovered"] = {
                "pref": recovered(res["none"]["pref"], res["in_context"]["pref"], res["diekae"]["pref"]),
                "acc": recovered(res["none"]["acc"], res["in_context"]["acc"], res["diekae"]["acc"]),
                "nll": recovered(res["none"]["nll"], res["in_context"]["nll"], res["diekae"]["nll"], True),
            }
            summary[key] = row
            results["runs"][key] = {m: res[m] for m in MODES}
    results["summary"] = summary
    results["minutes"] = (time.time() - t0) / 60
    out_dir = Path(out)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    plot_summary(summary, out_dir / "results.png")
    return results


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    titles = {"acc": "contains-answer accuracy", "f1": "SQuAD F1", "copy": "copy rate (3+ passage words)"}
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 2.2 * len(keys)), 4))
    for ax, metric in zip(axes, titles):
        width = 0.27
        for j, m in enumerate(MODES):
            ax.bar([i + (j - 1) * width for i in range(len(keys))], [summary[k][m].get(metric, 0.0) for k in keys],
                   width, label=m)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
        ax.set_title(titles[metric])
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
