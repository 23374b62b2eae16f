"""The decoder with and without a conversation's earlier turns, in each mode (docs/results.md section 5).

    python benchmarks/chat_turns.py

Asks "Where was she born?" after "Who is Marsul Vantrel married to?" / "Ithpelith Quorne.", with and
without those turns, in none / in_context / diekae, with the copy gate on (shipped) and off, and
prints each answer and the reader's P(no answer) for the question alone and written out.
"""

from __future__ import annotations

import math

from diekae_rag import DiekaeModel

PASSAGES = ["Marsul Vantrel is married to Ithpelith Quorne. Ithpelith Quorne was born in Davrenholt."]
TURNS = [{"role": "user", "content": "Who is Marsul Vantrel married to?"},
         {"role": "assistant", "content": "Ithpelith Quorne."},
         {"role": "user", "content": "Where was she born?"}]


def main() -> None:
    model = DiekaeModel.from_pretrained()
    for mode in ("none", "in_context", "diekae"):
        for gate in ((0.4, 1.0) if mode == "diekae" else (1.0,)):
            copy = {"gate_no_answer": gate}
            with_turns = model.generate(TURNS, PASSAGES, mode=mode, max_new_tokens=16, copy=copy)
            alone = model.generate(TURNS[-1]["content"], PASSAGES, mode=mode, max_new_tokens=16, copy=copy)
            print(f"{mode:10s} gate {gate}: with turns {with_turns!r} | alone {alone!r}")
    for q in ("Where was she born?", "Where was Ithpelith Quorne born?"):
        print(f"P(no answer | {q!r}) = {math.exp(model.answer_reader.no_answer_log_prob(q, PASSAGES)):.3f}")


if __name__ == "__main__":
    main()
