"""A CounterFact-style edit set, built from facts the decoder itself already states.

Candidates are (country, relation, object) triples; a candidate is kept only when the
decoder's greedy answer to the prompt contains the object. Each kept fact gets a new object of
the same type (another country's), template paraphrases and neighbourhood prompts that share
the relation but not the subject, each with that neighbour's own true object.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ..atomic import atomic_write_text

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Austria": "Vienna", "Poland": "Warsaw", "Hungary": "Budapest", "Belgium": "Brussels", "Thailand": "Bangkok",
    "Kenya": "Nairobi", "Peru": "Lima", "Argentina": "Buenos Aires", "Chile": "Santiago", "Cuba": "Havana",
    "Mexico": "Mexico City", "Canada": "Ottawa", "Australia": "Canberra", "India": "New Delhi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Turkey": "Ankara", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Czech Republic": "Prague", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "South Korea": "Seoul", "North Korea": "Pyongyang", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Saudi Arabia": "Riyadh", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Israel": "Jerusalem", "Ethiopia": "Addis Ababa", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Brazil": "Brasilia", "Pakistan": "Islamabad", "Afghanistan": "Kabul",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Mongolia": "Ulaanbaatar", "Iceland": "Reykjavik",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Croatia": "Zagreb", "Slovakia": "Bratislava",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Senegal": "Dakar", "Qatar": "Doha", "Libya": "Tripoli",
}
LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Japan": "Japanese",
    "China": "Chinese", "Russia": "Russian", "Greece": "Greek", "Portugal": "Portuguese", "Sweden": "Swedish",
    "Norway": "Norwegian", "Finland": "Finnish", "Denmark": "Danish", "Poland": "Polish", "Hungary": "Hungarian",
    "Netherlands": "Dutch", "Turkey": "Turkish", "Brazil": "Portuguese", "Mexico": "Spanish", "Egypt": "Arabic",
    "Thailand": "Thai", "Vietnam": "Vietnamese", "South Korea": "Korean", "Iran": "Persian", "Israel": "Hebrew",
    "Ukraine": "Ukrainian", "Romania": "Romanian", "Argentina": "Spanish", "Saudi Arabia": "Arabic",
    "Indonesia": "Indonesian", "Czech Republic": "Czech", "Bulgaria": "Bulgarian", "Iceland": "Icelandic",
}
RELATIONS = {
    "capital": (CAPITALS, "What is the capital of {s}?",
                ["Which city is the capital of {s}?", "Name the capital city of {s}.", "What city is {s}'s capital?"]),
    "language": (LANGUAGES, "What language is spoken in {s}?",
                 ["Which language do people in {s} speak?", "What is the main language of {s}?",
                  "People in {s} speak which language?"]),
}


def build_edit_set(model, n: int = 100, seed: int = 0, n_neighbours: int = 3) -> list[dict]:
    """Up to ``n`` edits of facts the decoder gets right (checked by greedy generation)."""
    rng = random.Random(seed)
    known = []
    cands = [(rel, s, o) for rel, (table, _, _) in RELATIONS.items() for s, o in table.items()]
    for i in tqdm(range(0, len(cands), 16), desc="checking facts the decoder states"):
        chunk = cands[i: i + 16]
        outs = model.generate_batch([RELATIONS[r][1].format(s=s) for r, s, _ in chunk], mode="none",
                                    max_new_tokens=16)
        known += [c for c, out in zip(chunk, outs) if c[2].lower() in out.lower()]
    rng.shuffle(known)
    edits = []
    for rel, s, old in known[:n]:
        table, prompt, paraphrases = RELATIONS[rel]
        new = rng.choice(sorted({o for o in table.values() if o != old}))
        neighbours = [(s2, o2) for r2, s2, o2 in known if r2 == rel and s2 != s and o2 not in (old, new)]
        rng.shuffle(neighbours)
        edits.append({"subject": s, "relation": rel, "prompt": prompt.format(s=s), "target_old": old,
                      "target_new": new, "paraphrases": [p.format(s=s) for p in paraphrases],
                      "neighborhood": [{"prompt": prompt.format(s=s2), "target": o2}
                                       for s2, o2 in neighbours[:n_neighbours]]})
    return edits


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path, required: Optional[tuple[str, ...]] = None) -> list[dict]:
    """Rows of a JSONL file; a bad line raises ValueError naming the file and line."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg}).") from exc
        missing = [k for k in required or () if not isinstance(row, dict) or not row.get(k)]
        if missing:
            raise ValueError(f"{path}:{i}: missing {missing}; each edit needs {list(required)}.")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no edits.")
    return rows
