"""A CounterFact-style edit set, built from facts the decoder itself already states.

Candidates are (country, relation, object) triples; a candidate is kept only when the
decoder's greedy answer to the prompt contains the object. Each kept fact gets a new object of
the same type (another country's), template paraphrases and neighbourhood prompts that share
the relation but not the subject, each with that neighbour's own true object.
"""

from __future__ import annotations

import json
import random
import re
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
CITY_COUNTRY = {
    "Lyon": "France", "Marseille": "France", "Munich": "Germany", "Hamburg": "Germany", "Milan": "Italy",
    "Naples": "Italy", "Barcelona": "Spain", "Seville": "Spain", "Osaka": "Japan", "Kyoto": "Japan",
    "Shanghai": "China", "Shenzhen": "China", "Mumbai": "India", "Kolkata": "India", "Toronto": "Canada",
    "Vancouver": "Canada", "Sydney": "Australia", "Melbourne": "Australia", "Chicago": "United States",
    "Los Angeles": "United States", "Houston": "United States", "Manchester": "England", "Liverpool": "England",
    "Glasgow": "Scotland", "Edinburgh": "Scotland", "Rio de Janeiro": "Brazil", "Sao Paulo": "Brazil",
    "Istanbul": "Turkey", "St Petersburg": "Russia", "Krakow": "Poland", "Porto": "Portugal",
    "Rotterdam": "Netherlands", "Zurich": "Switzerland", "Geneva": "Switzerland", "Alexandria": "Egypt",
    "Casablanca": "Morocco", "Lagos": "Nigeria", "Johannesburg": "South Africa", "Cape Town": "South Africa",
    "Guadalajara": "Mexico", "Busan": "South Korea", "Karachi": "Pakistan", "Dubai": "United Arab Emirates",
    "Auckland": "New Zealand", "Montreal": "Canada", "Florence": "Italy", "Venice": "Italy", "Salzburg": "Austria",
}
CURRENCIES = {
    "Japan": "yen", "China": "yuan", "India": "rupee", "United Kingdom": "pound", "Russia": "ruble",
    "Mexico": "peso", "Brazil": "real", "South Africa": "rand", "South Korea": "won", "Switzerland": "franc",
    "United States": "dollar", "Germany": "euro", "France": "euro", "Italy": "euro", "Turkey": "lira",
    "Poland": "zloty", "Sweden": "krona", "Thailand": "baht", "Vietnam": "dong", "Israel": "shekel",
    "Indonesia": "rupiah", "Saudi Arabia": "riyal", "Nigeria": "naira", "Ukraine": "hryvnia",
}
_CONTINENT_OF = {
    "Europe": "France Germany Italy Spain Greece Portugal Ireland Norway Sweden Finland Denmark Austria Poland "
              "Hungary Belgium Romania Bulgaria Serbia Netherlands Switzerland Iceland Croatia",
    "Asia": "Japan China India Iran Iraq Vietnam Indonesia Philippines Malaysia Thailand Pakistan Afghanistan "
            "Bangladesh Nepal Mongolia",
    "Africa": "Egypt Kenya Ethiopia Nigeria Ghana Morocco Algeria Tunisia Uganda Zimbabwe Senegal Libya",
    "South America": "Peru Argentina Chile Colombia Venezuela Brazil",
}
CONTINENTS = {c: cont for cont, cs in _CONTINENT_OF.items() for c in cs.split()}
RELATIONS = {
    "continent": (CONTINENTS, "On which continent is {s}?",
                  ["Which continent is {s} part of?", "{s} is a country on which continent?",
                   "On what continent does {s} lie?"]),
    "city_country": (CITY_COUNTRY, "In which country is the city of {s}?",
                     ["Which country is {s} in?", "{s} is a city in which country?", "Where is {s} located?"]),
    "currency": (CURRENCIES, "What is the currency of {s}?",
                 ["Which currency is used in {s}?", "What money do people use in {s}?",
                  "What is the official currency of {s}?"]),
    "capital": (CAPITALS, "What is the capital of {s}?",
                ["Which city is the capital of {s}?", "Name the capital city of {s}.", "What city is {s}'s capital?"]),
    "language": (LANGUAGES, "What language is spoken in {s}?",
                 ["Which language do people in {s} speak?", "What is the main language of {s}?",
                  "People in {s} speak which language?"]),
}


def build_edit_set(model, n: int = 100, seed: int = 0, n_neighbours: int = 3, n_retain: int = 3) -> list[dict]:
    """Up to ``n`` edits of facts the decoder gets right (checked by greedy generation).

    The known facts that are not edited are split in two: neighbourhood prompts (evaluation)
    and retain prompts (training may use them to keep unrelated answers unchanged). Both share
    the edit's relation where possible. A neighbourhood prompt is kept only if the unedited
    decoder already prefers its true object to the edit's new object (CounterFact's test), so
    the neighbourhood score measures what the edit breaks, not what the decoder never knew;
    each edit records how many candidates that test dropped.
    """
    rng = random.Random(seed)
    known = []
    cands = [(rel, s, o) for rel, (table, _, _) in RELATIONS.items() for s, o in table.items()]
    for i in tqdm(range(0, len(cands), 16), desc="checking facts the decoder states"):
        chunk = cands[i: i + 16]
        outs = model.generate_batch([RELATIONS[r][1].format(s=s) for r, s, _ in chunk], mode="none",
                                    max_new_tokens=16)
        known += [c for c, out in zip(chunk, outs) if c[2].lower() in out.lower()]
    rng.shuffle(known)
    n = min(n, max(1, len(known) - 30))  # keep at least 30 unedited facts for neighbours / retain
    edited, rest = known[:n], known[n:]
    neighbour_pool, retain_pool = rest[::2], rest[1::2]
    plans = []
    for rel, s, old in edited:
        new = rng.choice(sorted({o for o in RELATIONS[rel][0].values() if o != old}))
        same = [(r2, s2, o2) for r2, s2, o2 in neighbour_pool if r2 == rel and o2 not in (old, new)]
        candidates = rng.sample(same, min(3 * n_neighbours, len(same)))
        same_retain = [f for f in retain_pool if f[0] == rel and f[2] not in (old, new)]
        retain = rng.sample(same_retain, min(n_retain, len(same_retain)))
        retain += rng.sample([f for f in retain_pool if f not in retain], n_retain - len(retain))
        plans.append((rel, s, old, new, candidates, retain))
    checks = [(RELATIONS[r2][1].format(s=s2), o2, new) for *_, new, cands_, _ in plans for r2, s2, o2 in cands_]
    verdict = iter(preferences(model, [(p, truth, new, None) for p, truth, new in checks], "none"))
    edits = []
    for rel, s, old, new, candidates, retain in tqdm(plans, desc="building edits"):
        _, prompt, paraphrases = RELATIONS[rel]
        kept = [c for c in candidates if next(verdict)]
        neighbours = kept[:n_neighbours]
        edits.append({"subject": s, "relation": rel, "prompt": prompt.format(s=s), "target_old": old,
                      "target_new": new, "paraphrases": [p.format(s=s) for p in paraphrases],
                      "neighborhood": [{"prompt": RELATIONS[r2][1].format(s=s2), "target": o2}
                                       for r2, s2, o2 in neighbours],
                      "neighborhood_dropped": len(candidates) - len(kept),
                      "retain": [{"prompt": RELATIONS[r2][1].format(s=s2), "target": o2} for r2, s2, o2 in retain]})
    return edits


def reworded_neighbourhood(edits: list[dict]) -> list[dict]:
    """The edits with each neighbourhood prompt replaced by its relation's paraphrase wordings.

    A harder locality test: the neighbours are no longer worded like any edit prompt. Prompts
    that match no relation's prompt template are kept as they are; paraphrases are dropped.
    """
    patterns = [(re.compile(re.escape(prompt).replace(re.escape("{s}"), "(.+)") + "$"), paraphrases)
                for _, prompt, paraphrases in RELATIONS.values()]
    out = []
    for e in edits:
        reworded = []
        for n in e.get("neighborhood") or []:
            hits = [(m, paraphrases) for pattern, paraphrases in patterns if (m := pattern.match(n["prompt"]))]
            reworded += ([{"prompt": p.format(s=hits[0][0].group(1)), "target": n["target"]} for p in hits[0][1]]
                         if hits else [n])
        out.append(dict(e, paraphrases=[], neighborhood=reworded))
    return out


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


def preferences(model, rows: list[tuple[str, str, str, Optional[list]]], mode: str,
                batch_size: int = 32) -> list[bool]:
    """For each (prompt, better, worse, knowledge): is NLL(better) < NLL(worse)? Batched."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        prompts, better, worse, knowledge = (list(x) for x in zip(*chunk))
        a = model.score_batch(prompts, better, knowledge, mode=mode)
        b = model.score_batch(prompts, worse, knowledge, mode=mode)
        out += [x < y for x, y in zip(a, b)]
    return out
