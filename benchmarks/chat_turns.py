"""The decoder with and without a conversation's earlier turns, in each mode (docs/results.md section 5).

    python benchmarks/chat_turns.py

Asks "Where was she born?" after "Who is Marsul Vantrel married to?" / "Ithpelith Quorne.", with and
without those turns, in none / in_context / diekae; DIEKÆ with the shipped settings (the gate on,
``question_turns`` 3: the reader and the gate read the earlier turns too), with the last question
read alone (``question_turns`` 1) and with the gate off; then prints the reader's P(no answer) for
the question alone, as the conversation reads it, and written out, and for the conversation the
share on "no answer" or on the answer already given (what ``gate_given_answers`` reads).
"""

from __future__ import annotations

import math

from diekae_rag import DiekaeModel
from diekae_rag.copy import GATE_OFF

PASSAGES = ["Marsul Vantrel is married to Ithpelith Quorne. Ithpelith Quorne was born in Davrenholt."]
TURNS = [{"role": "user", "content": "Who is Marsul Vantrel married to?"},
         {"role": "assistant", "content": "Ithpelith Quorne."},
         {"role": "user", "content": "Where was she born?"}]


def main() -> None:
    model = DiekaeModel.from_pretrained()
    variants = {"shipped": None, "question_turns 1": {"question_turns": 1}, "gate off": GATE_OFF}
    for mode in ("none", "in_context", "diekae"):
        for name, copy in (variants.items() if mode == "diekae" else [("", None)]):
            with_turns = model.generate(TURNS, PASSAGES, mode=mode, max_new_tokens=16, copy=copy)
            alone = model.generate(TURNS[-1]["content"], PASSAGES, mode=mode, max_new_tokens=16, copy=copy)
            print(f"{mode:10s} {name:16s}: with turns {with_turns!r} | alone {alone!r}")
    (conversation,), given = model.knowledge.questions([model.prompter.prompt_ids(TURNS)], model.copy, [PASSAGES])
    reader = model.knowledge.turns_reader(model.answer_reader, given, model.copy)  # as the gate reads it: "Ithpelith Quorne" was said
    for q in ("Where was she born?", conversation, "Where was Ithpelith Quorne born?"):
        print(f"P(no answer | {q!r}) = {math.exp(reader.no_answer_log_prob(q, PASSAGES, model.copy.gate_nulls)):.3f}")
    said = reader.given_or_no_answer_log_prob(conversation, PASSAGES, model.copy.gate_nulls)
    print(f"P(no answer, or what was said | {conversation!r}) = {math.exp(said):.3f}"
          f" (gate_given_answers {model.copy.gate_given_answers})")


if __name__ == "__main__":
    main()
