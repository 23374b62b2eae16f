"""Do word overlap or the shape of the reader's starts add to its P(no answer) as a copy gate? Dev items only.

    python benchmarks/research/gate_features.py [--n 60] [--out benchmarks/results/gate_features.json]

For the dev items of ``benchmarks/gate_signals.py`` (answerable: fictional and SQuAD-Shifts train
items at k=1 and k=5 retrieved; not answerable: ``closed_book`` dev and
``unanswerable`` dev), it records the reader's P(no answer); for the sentence that holds the
reader's likeliest start, the share of the question's content words it holds (``cover``); and how
peaked the reader's starts are: the likeliest start's share of the mass on starts (``top_share``) and
the entropy of the starts (``entropy``). Then, for rules such as "gate where P(no answer) > a or
cover < b", the most negative dev items gated at each share of answerable SQuAD-Shifts items kept,
against P(no answer) alone.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import runpy
from pathlib import Path

import numpy as np

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text

STOP = set("""a an the of in on at to for from by with and or is are was were be been being do does did
what which who whom whose when where why how that this these those it its as into than then there their
they he she his her him them you your i we our us not no can could would should will shall may might must
have has had about after before during over under between through most more many much one other some any
s t name called type kind year""".split())


def content_words(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP}


def sentence_at(passage: str, char: int) -> str:
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", passage)]
    a = max(s for s in starts if s <= char)
    later = [s for s in starts if s > char]
    return passage[a:later[0] if later else len(passage)]


def features(model: DiekaeModel, items) -> dict[str, list[float]]:
    out = {"no_answer": [], "cover": [], "cover_max": [], "top_share": [], "entropy": []}
    for it in items:
        q, ps = it.question, list(it.passages)
        starts = model.answer_reader.char_log_probs(q, ps)
        out["no_answer"].append(math.exp(model.answer_reader.no_answer_log_prob(q, ps)))
        lps = np.array([v for s in starts for v in s.values()] or [0.0])
        p = np.exp(lps - lps.max())
        p /= p.sum()
        out["top_share"].append(float(p.max()))  # the likeliest start's share of the mass on starts
        out["entropy"].append(float(-(p * np.log(np.maximum(p, 1e-12))).sum()))
        words = content_words(q) or {""}
        best = max(((v, i, c) for i, s in enumerate(starts) for c, v in s.items()), default=None)
        sent = sentence_at(ps[best[1]], best[2]) if best else ""
        out["cover"].append(len(words & content_words(sent)) / len(words))
        every = [sentence_at(p, m.start()) for p in ps for m in re.finditer(r"(?:^|[.!?]\s+)\S", p)]
        out["cover_max"].append(max((len(words & content_words(s)) / len(words) for s in every), default=0.0))
    return out


def trade(sig: dict, rule, keep: float) -> dict:
    """Among the rule's settings, the one that gates the most negative dev items while every
    answerable SQuAD-Shifts set keeps at least ``keep`` of its items."""
    squad = [n for n in sig if n.startswith("squad")]
    negative = [n for n in sig if n.endswith("_dev")]
    best = None
    for setting, gate in rule:
        kept = min(1 - float(np.mean(gate(sig[n]))) for n in squad)
        gated = {n: float(np.mean(gate(sig[n]))) for n in negative}
        kept_all = {n: round(1 - float(np.mean(gate(sig[n]))), 3) for n in sig if n not in negative}
        if kept >= keep and (best is None or sum(gated.values()) > sum(best["gated"].values())):
            best = {"setting": setting, "kept": kept_all, "gated": {n: round(v, 3) for n, v in gated.items()}}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "results" / "gate_features.json")
    args = ap.parse_args()
    model = DiekaeModel.from_pretrained()
    dev_items = runpy.run_path(str(Path(__file__).resolve().parents[1] / "gate_signals.py"))["dev_items"]
    answerable, negative = dev_items(args.n)
    sets = {**answerable, **negative}
    sig = {name: features(model, items) for name, items in sets.items()}
    for name, s in sig.items():
        print(name, {k: round(float(np.median(v)), 3) for k, v in s.items()})
    nulls = sorted({v for s in sig.values() for v in s["no_answer"]} | {1.0})
    covers = [0.0, 0.1, 0.2, 0.25, 0.3, 0.34, 0.4, 0.5]
    shares = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    entropies = [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 99.0]
    rules = {
        "no_answer": [((a,), lambda s, a=a: np.array(s["no_answer"]) > a) for a in nulls],
        "no_answer_or_cover": [((a, b), lambda s, a=a, b=b: (np.array(s["no_answer"]) > a) | (np.array(s["cover"]) < b))
                               for a in nulls for b in covers],
        "no_answer_or_cover_max": [((a, b), lambda s, a=a, b=b: (np.array(s["no_answer"]) > a)
                                    | (np.array(s["cover_max"]) < b)) for a in nulls for b in covers],
        "no_answer_or_top_share": [((a, b), lambda s, a=a, b=b: (np.array(s["no_answer"]) > a)
                                    | (np.array(s["top_share"]) < b)) for a in nulls for b in shares],
        "no_answer_or_entropy": [((a, b), lambda s, a=a, b=b: (np.array(s["no_answer"]) > a)
                                  | (np.array(s["entropy"]) > b)) for a in nulls for b in entropies],
    }
    points = []
    for keep in (0.95, 0.92, 0.9):
        for name, rule in rules.items():
            row = {"rule": name, "keep": keep, **trade(sig, rule, keep)}
            points.append(row)
            print(json.dumps(row))
    atomic_write_text(args.out, json.dumps({"n": args.n, "points": points, "signals": sig}, indent=1))


if __name__ == "__main__":
    main()
