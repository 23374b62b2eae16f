"""Synthetic fictional facts: invented entities the decoder cannot know.

Each relation type has several passage phrasings and several question phrasings; answers are
invented multi-token names or values. Some relation types are held out of training so that
evaluation can measure transfer to relations never seen.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Optional

_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "cl", "dr",
           "gr", "kr", "pl", "st", "tr", "sh", "ph", "qu", "vr", "zh", "y"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y"]
_CODAS = ["", "", "n", "l", "r", "s", "th", "x", "m", "nd", "rk", "sh", "lt"]


def invented_word(rng: random.Random, syllables: Optional[int] = None) -> str:
    n = syllables or rng.choice([2, 2, 3, 3, 4])
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n)).capitalize()


def person(rng: random.Random) -> str:
    return invented_word(rng) + (" " + invented_word(rng, 2) if rng.random() < 0.5 else "")


def place(rng: random.Random) -> str:
    return invented_word(rng) + rng.choice(["", "", " Vale", "ford", "heim", " Harbor", "mere"])


def thing(rng: random.Random) -> str:
    return invented_word(rng).lower()


def year(rng: random.Random) -> str:
    return str(rng.randint(1203, 2089))


def number(rng: random.Random) -> str:
    return str(rng.randint(3, 9999))


def colour(rng: random.Random) -> str:
    return rng.choice(["crimson", "teal", "amber", "violet", "ochre", "indigo", "silver", "olive", "scarlet",
                       "cobalt", "ivory", "saffron", "maroon", "turquoise", "charcoal", "lilac"])


@dataclass(frozen=True)
class Relation:
    name: str
    subject: Callable[[random.Random], str]
    answer: Callable[[random.Random], str]
    passages: tuple[str, ...]   # "{s}" subject, "{a}" answer
    questions: tuple[str, ...]


RELATIONS: list[Relation] = [
    Relation("spouse", person, person,
             ("{s} is married to {a}.", "{s} married {a} in a quiet ceremony.", "The spouse of {s} is {a}."),
             ("Who is {s} married to?", "Who is the spouse of {s}?", "Whom did {s} marry?")),
    Relation("birthplace", person, place,
             ("{s} was born in {a}.", "{s} grew up in {a}, the town of their birth.", "The birthplace of {s} is {a}."),
             ("Where was {s} born?", "What is the birthplace of {s}?", "In which town was {s} born?")),
    Relation("capital", place, place,
             ("The capital of {s} is {a}.", "{a} serves as the capital of {s}.", "{s} is governed from its capital, {a}."),
             ("What is the capital of {s}?", "Which city is the capital of {s}?", "Where is the capital of {s}?")),
    Relation("founder", place, person,
             ("{s} was founded by {a}.", "{a} founded {s} long ago.", "The founder of {s} was {a}."),
             ("Who founded {s}?", "Who was the founder of {s}?", "By whom was {s} founded?")),
    Relation("mentor", person, person,
             ("{s} studied under {a}.", "The mentor of {s} was {a}.", "{a} taught {s} for many years."),
             ("Who was the mentor of {s}?", "Under whom did {s} study?", "Who taught {s}?")),
    Relation("pet", person, thing,
             ("{s} keeps a pet called {a}.", "The pet of {s} is named {a}.", "{s} owns an animal named {a}."),
             ("What is the name of {s}'s pet?", "What is {s}'s pet called?", "What pet does {s} keep?")),
    Relation("founding_year", place, year,
             ("{s} was founded in {a}.", "The town of {s} dates from {a}.", "In {a}, {s} was founded."),
             ("When was {s} founded?", "In what year was {s} founded?", "What year does {s} date from?")),
    Relation("river", place, place,
             ("The river {a} flows through {s}.", "{s} lies on the banks of the {a}.", "{s} is crossed by the river {a}."),
             ("Which river flows through {s}?", "What river is {s} on?", "What is the name of the river in {s}?")),
    Relation("invention", person, thing,
             ("{s} invented the {a}.", "The {a} was invented by {s}.", "{s} is known as the inventor of the {a}."),
             ("What did {s} invent?", "What is {s} the inventor of?", "Which device did {s} invent?")),
    Relation("employer", person, place,
             ("{s} works for {a} Industries.", "{s} is employed at {a} Industries.", "The employer of {s} is {a} Industries."),
             ("Who does {s} work for?", "Who is the employer of {s}?", "Where is {s} employed?")),
    Relation("instrument", person, thing,
             ("{s} plays the {a}.", "{s} is a famous player of the {a}.", "The instrument of {s} is the {a}."),
             ("What instrument does {s} play?", "Which instrument is {s} known for?", "What does {s} play?")),
    Relation("population", place, number,
             ("{s} has a population of {a}.", "About {a} people live in {s}.", "The population of {s} is {a}."),
             ("What is the population of {s}?", "How many people live in {s}?", "How large is the population of {s}?")),
    Relation("colour", thing, colour,
             ("The flag of {s} is {a}.", "{s} flies a {a} flag.", "The colour of the {s} flag is {a}."),
             ("What colour is the flag of {s}?", "Which colour is the {s} flag?", "What is the colour of {s}'s flag?")),
    Relation("author", thing, person,
             ("The book {s} was written by {a}.", "{a} wrote the book {s}.", "The author of {s} is {a}."),
             ("Who wrote the book {s}?", "Who is the author of {s}?", "Who was {s} written by?")),
    Relation("language", place, thing,
             ("People in {s} speak {a}.", "The language of {s} is {a}.", "In {s}, the main language is {a}."),
             ("What language is spoken in {s}?", "Which language do people in {s} speak?", "What is the language of {s}?")),
    Relation("sibling", person, person,
             ("{s} has a sibling named {a}.", "The sibling of {s} is {a}.", "{a} is the sibling of {s}."),
             ("Who is the sibling of {s}?", "What is the name of {s}'s sibling?", "Who is {s}'s sibling?")),
    Relation("school", person, place,
             ("{s} studied at the University of {a}.", "{s} graduated from the University of {a}.",
              "The alma mater of {s} is the University of {a}."),
             ("Where did {s} study?", "Which university did {s} attend?", "What is the alma mater of {s}?")),
    Relation("dish", place, thing,
             ("The famous dish of {s} is {a}.", "{s} is known for a dish called {a}.", "Visitors to {s} eat {a}."),
             ("What is the famous dish of {s}?", "Which dish is {s} known for?", "What do visitors to {s} eat?")),
    # Held out of training by default (unseen relation types).
    Relation("leader", place, person,
             ("{s} is led by {a}.", "The leader of {s} is {a}.", "{a} rules over {s}."),
             ("Who leads {s}?", "Who is the leader of {s}?", "Who rules {s}?")),
    Relation("ship", person, thing,
             ("{s} sails a ship named {a}.", "The ship of {s} is called {a}.", "{s} captains the {a}."),
             ("What is the name of {s}'s ship?", "Which ship does {s} sail?", "What ship does {s} captain?")),
    Relation("mountain", place, place,
             ("The highest peak in {s} is Mount {a}.", "Mount {a} towers over {s}.", "{s} lies below Mount {a}."),
             ("What is the highest peak in {s}?", "Which mountain towers over {s}?", "What mountain is near {s}?")),
    Relation("deathyear", person, year,
             ("{s} died in {a}.", "{s} passed away in {a}.", "The year of {s}'s death was {a}."),
             ("When did {s} die?", "In what year did {s} pass away?", "What year did {s} die?")),
]

HELD_OUT = ("leader", "ship", "mountain", "deathyear")


@dataclass
class Fact:
    passage: str
    question: str
    answer: str
    distractor: str
    relation: str
    subject: str

    def to_dict(self) -> dict:
        return asdict(self)


def _fact(rng: random.Random, rel: Relation, subject: Optional[str] = None) -> tuple[str, str, str, str]:
    s = subject or rel.subject(rng)
    a = rel.answer(rng)
    d = rel.answer(rng)
    while d == a:
        d = rel.answer(rng)
    return s, a, d, rng.choice(rel.passages).format(s=s, a=a)


def make_facts(n: int, seed: int = 0, relations: str = "train", other_facts: tuple[int, int] = (0, 0)
               ) -> list[Fact]:
    """``n`` single-question items. ``relations`` is ``train``, ``held_out`` or ``all``.

    ``other_facts=(lo, hi)`` adds lo..hi other facts to each passage (some about the same
    subject, some of the same relation about other subjects), shuffled around the gold one.
    """
    rng = random.Random(seed)
    pool = [r for r in RELATIONS if relations == "all" or (r.name in HELD_OUT) == (relations == "held_out")]
    out = []
    for _ in range(n):
        rel = rng.choice(pool)
        s, a, d, sent = _fact(rng, rel)
        sentences = [sent]
        for _ in range(rng.randint(*other_facts)):
            r2 = rng.choice(pool)
            if rng.random() < 0.4 and r2.subject is rel.subject and r2 is not rel:
                sentences.append(_fact(rng, r2, subject=s)[3])       # same subject, other relation
            elif rng.random() < 0.5:
                sentences.append(_fact(rng, rel)[3])                  # same relation, other subject
            else:
                sentences.append(_fact(rng, r2)[3])
        rng.shuffle(sentences)
        out.append(Fact(" ".join(sentences), rng.choice(rel.questions).format(s=s), a, d, rel.name, s))
    return out
