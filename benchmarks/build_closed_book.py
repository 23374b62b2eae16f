"""Build the ``closed_book`` evaluation set (diekae_rag/data/closed_book.json).

    python benchmarks/build_closed_book.py

Keeps the questions of ``diekae_rag/data/general_knowledge.py`` that the bare shipped decoder
(``mode="none"``, greedy, 24 new tokens) answers right, and gives each the 3 NYT paragraphs of
SQuAD-Shifts that MiniLM ranks nearest, leaving out any that holds an accepted answer. Needs the
SQuAD-Shifts files (``../shared/data`` or ``diekae-rag data``).
"""

from __future__ import annotations

import json

from diekae_rag import DiekaeModel
from diekae_rag.atomic import atomic_write_text
from diekae_rag.data.general_knowledge import questions
from diekae_rag.data.negatives import CLOSED_BOOK, build_closed_book
from diekae_rag.data.squad import default_data_dir
from diekae_rag.evaluation import contains


def main() -> None:
    model = DiekaeModel.from_pretrained()
    pairs = questions()
    known = []
    for i in range(0, len(pairs), 32):
        batch = pairs[i: i + 32]
        outs = model.generate_batch([q for q, _ in batch], mode="none", max_new_tokens=24)
        known += [(q, answers) for (q, answers), out in zip(batch, outs) if any(contains(out, a) for a in answers)]
    nyt = json.loads((default_data_dir() / "nyt_v1.0.json").read_text(encoding="utf-8"))
    corpus = sorted({p["context"] for art in nyt["data"] for p in art["paragraphs"]})
    data = build_closed_book(known, corpus, nyt["canary"])
    atomic_write_text(CLOSED_BOOK, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    splits = [x["split"] for x in data["items"]]
    print(f"{len(known)} of {len(pairs)} questions answered by the bare decoder; "
          f"dev {splits.count('dev')}, eval {splits.count('eval')} -> {CLOSED_BOOK}")


if __name__ == "__main__":
    main()
