"""The copy gate: where the passages do not answer, the decoder sees exactly what it sees with no knowledge."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_model

from diekae_rag import CopyConfig
from diekae_rag.copy import PassagePrior
from diekae_rag.data.negatives import NegativeItem
from diekae_rag.evaluation import evaluate_negatives
from diekae_rag.indexing import warm_up

ON_TOPIC = ["Calgra lies in the north of Vell.", "It rains in Calgra."]
OFF_TOPIC = ["The harbour froze early that winter.", "Prices of wool fell again."]


class TopicEmbedder:
    """A stand-in sentence embedder: texts naming Calgra point one way, all others another."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts += list(texts)
        return np.array([[1.0, 0.0] if "calgra" in t.lower() else [0.0, 1.0] for t in texts], dtype=np.float32)


class NullReader:
    """A stand-in reader sure that passages about wool hold no answer."""

    def char_log_probs(self, question, passages):
        return [{0: -1.0} for _ in passages]

    def no_answer_log_prob(self, question, passages, nulls="max"):
        return math.log(0.95) if any("wool" in p for p in passages) else math.log(0.05)


def _model(**copy):
    model = tiny_model("llama", layers=[1, 2], per_step=True, pointer_layer=3, pointer_heads=2, passage_isolation=True,
                       pointer_match=True, **copy)
    model.passage_prior = PassagePrior(embedder=TopicEmbedder())
    return model


def test_a_closed_gate_gives_exactly_the_answer_without_knowledge():
    model = _model(gate_cosine=0.5)
    q = "Where is Calgra?"
    none = model.generate(q, mode="none", max_new_tokens=8)
    assert model.generate(q, OFF_TOPIC, max_new_tokens=8) == none
    assert model.score(q, "north", OFF_TOPIC) == model.score(q, "north", mode="none")
    open_ = model.generate(q, ON_TOPIC, max_new_tokens=8, copy={"gate_cosine": 0.0})
    assert model.generate(q, ON_TOPIC, max_new_tokens=8) == open_, "an answering passage passes the gate unchanged"
    assert model.score(q, "north", ON_TOPIC) != model.score(q, "north", mode="none")
    both = model.generate_batch([q, q], [OFF_TOPIC, ON_TOPIC], max_new_tokens=8)
    assert both == [none, open_], "the gate acts per item in a batch"


def test_abstention_returns_the_fixed_sentence_where_the_gate_closes():
    model = _model(gate_cosine=0.5, on_no_answer="abstain", no_answer_text="Not in the documents.")
    q = "Where is Calgra?"
    assert model.generate(q, OFF_TOPIC, max_new_tokens=8) == "Not in the documents."
    assert "".join(model.stream(q, OFF_TOPIC, max_new_tokens=8)) == "Not in the documents."
    embedder = model.passage_prior.embedder
    embedder.texts.clear()
    assert model.generate(q, ON_TOPIC, max_new_tokens=8) != "Not in the documents."
    assert embedder.texts.count(q) == 1, "the gate is computed once per call"
    embedder.texts.clear()
    "".join(model.stream(q, ON_TOPIC, max_new_tokens=8))
    assert embedder.texts.count(q) == 1, "and once per stream"
    assert model.generate(q, max_new_tokens=8) != "Not in the documents.", "no knowledge: nothing to gate"
    assert model.generate(q, OFF_TOPIC, mode="in_context", max_new_tokens=8) != "Not in the documents."
    items = [NegativeItem(q, OFF_TOPIC, ["north"]), NegativeItem(q, ON_TOPIC, ["north"])]
    res = evaluate_negatives(model, items, "diekae", max_new_tokens=8)
    assert res["abstain"] == res["gated"] == 0.5 and res["n"] == 2 and 0 <= res["copy"] <= 1


def test_the_reader_signal_closes_the_gate_and_bad_settings_are_refused():
    model = _model(gate_no_answer=0.5)
    model.answer_reader = NullReader()
    q = "Where is Calgra?"
    wool = ["Calgra sells wool.", "Prices of wool fell again."]
    assert model.generate(q, wool, max_new_tokens=8) == model.generate(q, mode="none", max_new_tokens=8)
    assert model.gate([q, q, q], [wool, ON_TOPIC, []]) == [False, True, True]
    assert model.gate([q], [wool], copy={"gate_no_answer": 1.0}) == [True], "off: the gate cannot close"
    with pytest.raises(ValueError, match="gate_cosine must be in"):
        CopyConfig(gate_cosine=1.5)
    with pytest.raises(ValueError, match="on_no_answer must be"):
        CopyConfig(on_no_answer="refuse")
    with pytest.raises(ValueError, match="gate_nulls must be"):
        CopyConfig(gate_nulls="sum")

    class EveryWindowSure(NullReader):  # sure only when every window's "no answer" counts
        def no_answer_log_prob(self, question, passages, nulls="max"):
            return math.log(0.9 if nulls == "every" else 0.2)

    model.answer_reader = EveryWindowSure()
    assert model.gate([q], [ON_TOPIC], copy={"gate_nulls": "max"}) == [True]
    assert model.gate([q], [ON_TOPIC], copy={"gate_nulls": "every"}) == [False], "the gate reads gate_nulls"
    model.answer_reader = None
    with pytest.raises(ValueError, match="needs an answer-start reader"):
        model.generate(q, wool, max_new_tokens=2)


def test_framework_components_pass_abstention_through():
    from diekae_rag.integrations.langchain import ChatDiekae, DiekaeLLM
    from diekae_rag.integrations.llamaindex import DiekaeLLM as LlamaDiekaeLLM
    from langchain_core.messages import HumanMessage
    model = _model(gate_cosine=0.5)
    q = "Where is Calgra?"
    assert DiekaeLLM(model=model, max_new_tokens=8, on_no_answer="abstain").invoke(q, passages=OFF_TOPIC) == \
        model.copy.no_answer_text
    chat = ChatDiekae(model=model, max_new_tokens=8, copy_settings={"on_no_answer": "abstain", "no_answer_text": "Unknown."})
    assert chat.invoke([HumanMessage(q)], passages=OFF_TOPIC).content == "Unknown."
    llm = LlamaDiekaeLLM(model=model, max_new_tokens=8, on_no_answer="abstain")
    assert llm.complete(q, knowledge=OFF_TOPIC).text == model.copy.no_answer_text
    assert llm.complete(q, knowledge=ON_TOPIC).text != model.copy.no_answer_text


def test_warm_up_runs_the_encoders_even_where_the_gate_would_close():
    class Closed(NullReader):
        def no_answer_log_prob(self, question, passages, nulls="max"):
            return math.log(0.99)

    model = _model(gate_no_answer=0.5)
    model.answer_reader = Closed()
    warm_up(model)
    assert model.knowledge.passage_cache.misses >= 5, "the warm-up call encoded 5 passages, as a query at k=5 does"


class FixedReader(NullReader):
    """A stand-in reader whose P("no answer") is set by the test."""

    def __init__(self, p: float) -> None:
        self.p = p

    def no_answer_log_prob(self, question, passages, nulls="max"):
        return math.log(self.p)


def test_a_ramp_half_opens_the_gate_and_scales_what_the_encoders_write():
    import torch
    model = _model(gate_no_answer=0.4, gate_ramp=0.2)
    q = "Where is Calgra?"
    reader = model.answer_reader = FixedReader(0.3)
    assert model.gate_strength([q, q], [ON_TOPIC, []]) == [pytest.approx(0.5), 1.0]
    assert model.gate([q], [ON_TOPIC]) == [True], "half open is open"
    ungated = {"gate_no_answer": 1.0, "gate_ramp": 0.0}
    full, none = model.score(q, "north", ON_TOPIC, copy=ungated), model.score(q, "north", mode="none")
    half = model.score(q, "north", ON_TOPIC)
    assert half != pytest.approx(full, abs=1e-6) and half != pytest.approx(none, abs=1e-6)
    assert model.score(q, "north", ON_TOPIC, copy={"gate_ramp": 0.0}) == full, "no ramp: open as before"
    reader.p = 0.15  # below gate_no_answer - gate_ramp: fully open
    assert model.gate_strength([q], [ON_TOPIC]) == [1.0] and model.score(q, "north", ON_TOPIC) == full
    reader.p = 0.45  # above the threshold: closed, exactly mode="none"
    assert model.gate_strength([q], [ON_TOPIC]) == [0.0] and model.score(q, "north", ON_TOPIC) == none

    prompts, passages = model.prepare([q], [ON_TOPIC])
    ids, mask = model.prompter.pad(prompts, model.device, side="left")
    with torch.inference_mode():
        open_, halved = (model.build_injection(prompts, passages, mask, gate=[g]) for g in (1.0, 0.25))
        for layer, rows in open_.sessions[0].layer_rows.items():
            assert rows.abs().sum() > 0
            torch.testing.assert_close(halved.sessions[0].layer_rows[layer], rows * 0.25)
        step = torch.tensor([[5]])
        open_step, halved_step = open_.sessions[0].step(step), halved.sessions[0].step(step)
        assert open_step, "per-step rows"
        for layer, rows in open_step.items():
            torch.testing.assert_close(halved_step[layer], rows * 0.25)
    with pytest.raises(ValueError, match="gate_ramp .* must not exceed gate_no_answer"):
        CopyConfig(gate_no_answer=0.3, gate_ramp=0.4)
    with pytest.raises(ValueError, match="gate_ramp must be in"):
        CopyConfig(gate_ramp=-0.1)


def test_question_turns_let_the_reader_and_the_gate_read_a_follow_up_with_its_history():
    class Recorder(NullReader):
        def __init__(self) -> None:
            self.questions: list[str] = []

        def char_log_probs(self, question, passages):
            self.questions.append(question)
            return super().char_log_probs(question, passages)

        def no_answer_log_prob(self, question, passages, nulls="max"):
            self.questions.append(question)
            return math.log(0.05) if "Calgra" in question else math.log(0.9)

    model = _model(gate_no_answer=0.5, reader_weight=1.0)
    reader = model.answer_reader = Recorder()
    turns = [{"role": "user", "content": "Who founded Calgra?"}, {"role": "assistant", "content": "Orvel Tann."},
             {"role": "user", "content": "Where is it?"}]
    prompt = model.prompter.prompt_ids(turns)
    assert model.prompter.question_text(prompt) == model.prompter.user_text(prompt) == "Where is it?"
    assert model.prompter.question_text(prompt, 2) == "Orvel Tann. Where is it?"
    assert model.prompter.question_text(prompt, 3) == model.prompter.question_text(prompt, 9) == \
        "Who founded Calgra? Orvel Tann. Where is it?"
    single = model.prompter.prompt_ids("Where is Calgra?")
    assert model.prompter.question_text(single, 3) == "Where is Calgra?", "one turn: the question alone"

    assert model.gate([turns], [ON_TOPIC]) == [False], "the last question alone names nothing: closed"
    assert model.gate([turns], [ON_TOPIC], copy={"question_turns": 3}) == [True]
    reader.questions.clear()
    model.generate(turns, ON_TOPIC, max_new_tokens=2, copy={"question_turns": 3})
    assert reader.questions and set(reader.questions) == {"Who founded Calgra? Orvel Tann. Where is it?"}, \
        "the gate and the reader's first-token scores read the same question"
    with pytest.raises(ValueError, match="question_turns must be a whole number"):
        CopyConfig(question_turns=0)


def test_a_follow_up_is_not_answered_with_what_an_earlier_turn_said():
    from diekae_rag.copy.providers import GivenAnswersSkipped
    passage = "Calgra was founded by Orvel Tann. It lies on the Vell."
    said, other = passage.index("Orvel"), passage.index("Vell")

    class Reader:
        def char_log_probs(self, question, passages):
            return [{said: math.log(0.6), said + 6: math.log(0.1), other: math.log(0.2)}]

        def no_answer_log_prob(self, question, passages, nulls="max"):
            return math.log(0.1)

    q = "Who founded Calgra? Orvel Tann. Where is it?"
    skipped = GivenAnswersSkipped(Reader(), {q: ["Orvel Tann."]})
    (lp,), null = skipped.char_log_probs(q, [passage]), skipped.no_answer_log_prob(q, [passage])
    assert set(lp) == {other}, "no start inside the answer already given"
    assert math.exp(lp[other]) == pytest.approx(0.2 / 0.3) and math.exp(null) == pytest.approx(0.1 / 0.3)
    assert skipped.char_log_probs("Where is Calgra?", [passage])[0] == Reader().char_log_probs(q, [passage])[0], \
        "a question with no earlier answers reads as before"

    class TwoWindows(Reader):  # on the scale where the starts (0.9) and the best window's slot (0.1) sum to 1,
        def no_answer_log_prob(self, question, passages, nulls="max"):  # a second window's slot adds 0.2
            return math.log(0.1) if nulls == "max" else math.log(0.3 / 1.2)

    skipped = GivenAnswersSkipped(TwoWindows(), {q: ["Orvel Tann."]})
    assert math.exp(skipped.no_answer_log_prob(q, [passage], "every")) == pytest.approx(0.3 / 0.5), \
        "the given answer's starts (0.7) are taken out beside every window's 'no answer'"
    assert skipped.no_answer_log_prob("Where is Calgra?", [passage], "every") == pytest.approx(math.log(0.25))

    # "No answer" or what was said: 0.1 beside the starts' 0.9, of which the given answer holds 0.7.
    skipped = GivenAnswersSkipped(Reader(), {q: ["Orvel Tann."]})
    assert math.exp(skipped.given_or_no_answer_log_prob(q, [passage])) == pytest.approx(0.1 + 0.7)
    skipped = GivenAnswersSkipped(TwoWindows(), {q: ["Orvel Tann."]})
    assert math.exp(skipped.given_or_no_answer_log_prob(q, [passage], "every")) == pytest.approx(0.25 + 0.75 * 0.7 / 0.9)
    assert skipped.given_or_no_answer_log_prob("Where is Calgra?", [passage], "every") == pytest.approx(math.log(0.25)), \
        "no earlier answers: the plain 'no answer'"


def test_the_gate_closes_on_a_follow_up_whose_passage_holds_only_what_was_said():
    """``gate_given_answers`` reads the reader's starts on earlier answers; a single question never does."""
    passage = "Calgra was founded by Orvel Tann. It rains there."
    said, other = passage.index("Orvel"), passage.index("rains")

    class SaidReader(NullReader):  # starts: 0.85 on the answer already given, 0.1 elsewhere; "no answer" 0.05
        def char_log_probs(self, question, passages):
            return [{said: math.log(0.85), other: math.log(0.1)} for _ in passages]

        def no_answer_log_prob(self, question, passages, nulls="max"):
            return math.log(0.05)

    model = _model(gate_no_answer=0.5, gate_ramp=0.0, question_turns=3)
    model.answer_reader = SaidReader()
    turns = [{"role": "user", "content": "Who founded Calgra?"}, {"role": "assistant", "content": "Orvel Tann."},
             {"role": "user", "content": "Where is it?"}]
    single = "Who founded Calgra?"
    assert model.gate([turns, single], [[passage]] * 2) == [True, True], \
        "off: without the given answer's starts, P(no answer) is 0.05 / 0.15, under 0.5"
    assert model.gate([turns, single], [[passage]] * 2, copy={"gate_given_answers": 0.85}) == [False, True], \
        "0.05 + 0.85 over 0.85 closes the follow-up; the single question (P 0.05) stays open"
    assert model.gate([turns], [[passage]], copy={"gate_given_answers": 0.85, "question_turns": 1}) == [True], \
        "the last question read alone has no earlier answers"
    none = model.generate(turns, mode="none", max_new_tokens=6)
    assert model.generate(turns, [passage], max_new_tokens=6, copy={"gate_given_answers": 0.85}) == none
    model.answer_reader = None
    with pytest.raises(ValueError, match="gate_given_answers needs an answer-start reader"):
        model.gate([turns], [[passage]], copy={"gate_no_answer": 1.0, "gate_given_answers": 0.85})
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="gate_given_answers must be in"):
            CopyConfig(gate_given_answers=bad)


class RecordingReader(NullReader):
    """A stand-in reader that records which passages it is asked to read."""

    def __init__(self) -> None:
        self.read: list[list[str]] = []

    def char_log_probs(self, question, passages):
        self.read.append(list(passages))
        return super().char_log_probs(question, passages)

    def no_answer_log_prob(self, question, passages, nulls="max"):
        self.read.append(list(passages))
        return super().no_answer_log_prob(question, passages, nulls)


def test_the_reader_the_prior_and_the_gate_read_only_the_passages_the_encoders_hold():
    """Passages past max_knowledge_tokens give the copy nowhere to start, so the reader, the prior and
    the gate leave them out; a passage cut part-way is read whole. The encoders still warn of the cut."""
    from diekae_rag import KnowledgeTruncatedWarning
    model = _model(gate_no_answer=0.5, reader_weight=1.0, passage_prior=1.0, max_knowledge_tokens=40)
    model.answer_reader = reader = RecordingReader()
    passages = ON_TOPIC + ["Prices of wool fell again."]  # 33 + 19 + 26 byte tokens
    assert model.prompter.held(passages) == ON_TOPIC
    with pytest.warns(KnowledgeTruncatedWarning, match="from 2 of 3 passage"):
        with_wool = model.generate("Where is Calgra?", passages, max_new_tokens=4)
    assert reader.read and all(ps == ON_TOPIC for ps in reader.read), "wool is past the budget: not read"
    assert all("wool" not in t for t in model.passage_prior.embedder.texts)
    with pytest.warns(KnowledgeTruncatedWarning):
        assert with_wool == model.generate("Where is Calgra?", ON_TOPIC + ["Prices rose."], max_new_tokens=4), \
            "the gate stays open: what lies past the budget does not count"
    assert model.prompter.held(ON_TOPIC) == ON_TOPIC


def test_reader_margin_reads_only_the_passages_near_the_question():
    """With reader_margin the reader (and so the gate) reads only the passages whose cosine lies within
    the margin of the best one's; the others get no start. Off, it reads them all."""
    from diekae_rag.copy.providers import NearPassagesRead
    model = _model(gate_no_answer=0.5, reader_weight=1.0, passage_prior=1.0)
    model.answer_reader = reader = RecordingReader()
    q, passages = "Where is Calgra?", ON_TOPIC + ["Prices of wool fell again."]  # cosines 1, 1, 0
    assert model.gate([q], [passages]) == [False], "read whole, the wool passage closes the gate"
    assert all(ps == passages for ps in reader.read)
    reader.read.clear()
    near = {"reader_margin": 0.5}
    assert model.gate([q], [passages], copy=near) == [True], "wool is far from the question: not read"
    answer = model.generate(q, passages, max_new_tokens=4, copy=near)
    assert reader.read and all(ps == ON_TOPIC for ps in reader.read)
    assert answer != model.generate(q, mode="none", max_new_tokens=4)
    wrapped = model.knowledge.reader_for(model.copy.replace(reader_margin=0.5))
    assert isinstance(wrapped, NearPassagesRead)
    lps = wrapped.char_log_probs(q, passages)
    assert lps[2] == {} and lps[0] == {0: -1.0}, "an unread passage has no start"
    assert wrapped.near(q, passages[:1]) == [0]
    assert model.knowledge.reader_for(model.copy) is reader, "off: the reader itself"
    with pytest.raises(ValueError, match="reader_margin must be 0"):
        CopyConfig(reader_margin=-0.1)
    model.passage_prior = None
    assert model.knowledge.reader_for(model.copy.replace(reader_margin=0.5)) is reader, \
        "without the passage embedder there are no cosines: it reads every passage"
    assert model.gate([q], [passages], copy={**near, "passage_prior": 0.0}) == [False]


class QuestionsRead(NullReader):
    """A stand-in reader that records the questions it reads and says "no answer" with ``p``."""

    def __init__(self, p: float) -> None:
        self.p, self.questions, self.starts = p, [], []

    def char_log_probs(self, question, passages):
        self.questions.append(question)
        self.starts.append(question)
        return super().char_log_probs(question, passages)

    def no_answer_log_prob(self, question, passages, nulls="max"):
        self.questions.append(question)
        return math.log(self.p)


def test_a_follow_up_reader_reads_the_questions_with_earlier_turns_and_no_other():
    """``followup_reader`` reads a conversation's follow-up for the gate and the first copy; a single
    question, in the same batch or alone, is read by ``answer_reader`` as before."""
    model = _model(gate_no_answer=0.5, gate_ramp=0.0, reader_weight=1.0, question_turns=3)
    model.answer_reader = single = QuestionsRead(0.05)
    model.followup_reader = followups = QuestionsRead(0.95)
    turns = [{"role": "user", "content": "Who founded Calgra?"}, {"role": "assistant", "content": "Orvel Tann."},
             {"role": "user", "content": "Where is it?"}]
    conversation = "Who founded Calgra? Orvel Tann. Where is it?"
    assert model.gate([turns, "Where is Calgra?"], [ON_TOPIC] * 2) == [False, True], \
        "the follow-up reader's 'no answer' (0.95) closes the follow-up; the single question reads 0.05"
    assert set(followups.questions) == {conversation} and set(single.questions) == {"Where is Calgra?"}
    followups.questions.clear()
    single.questions.clear()
    alone = model.generate("Where is Calgra?", ON_TOPIC, max_new_tokens=4)
    assert single.questions and not followups.questions, "a single question never reads the follow-up reader"
    assert model.generate(turns, ON_TOPIC, max_new_tokens=4) == model.generate(turns, mode="none", max_new_tokens=4)
    assert set(followups.questions) == {conversation}
    followups.p, single.starts = 0.05, []
    model.generate(turns, ON_TOPIC, max_new_tokens=4)
    assert conversation in followups.starts and not single.starts, "the first copy's starts come from it too"
    model.followup_reader = None
    assert model.gate([turns], [ON_TOPIC]) == [True], "without one, the answer reader reads follow-ups too"
    assert model.generate("Where is Calgra?", ON_TOPIC, max_new_tokens=4) == alone
    with pytest.raises(ValueError, match="A follow-up reader biases the copy readout"):
        tiny_model("llama").followup_reader = single


def test_alone_first_reads_a_follow_up_that_names_its_subject_as_a_single_question():
    """With ``alone_first``, the last question is read alone where the reader finds its answer alone,
    and with its earlier turns elsewhere; off, always with them."""
    class NamesCalgra(QuestionsRead):  # "no answer" unless the question names Calgra
        def no_answer_log_prob(self, question, passages, nulls="max"):
            self.questions.append(question)
            return math.log(0.05 if "Calgra" in question else 0.95)

    model = _model(gate_no_answer=0.7, gate_ramp=0.0, reader_weight=1.0, question_turns=3)
    model.answer_reader = NamesCalgra(0.0)
    elliptic = [{"role": "user", "content": "Who founded Calgra?"}, {"role": "assistant", "content": "Orvel Tann."},
                {"role": "user", "content": "Where is it?"}]
    named = [{"role": "user", "content": "Who founded Vell?"}, {"role": "assistant", "content": "Orvel Tann."},
             {"role": "user", "content": "Where is Calgra?"}]
    prompts = [model.prompter.prompt_ids(t) for t in (elliptic, named)]
    both = "Who founded Vell? Orvel Tann. Where is Calgra?"
    assert model.knowledge.questions(prompts, model.copy, [ON_TOPIC] * 2)[0] == \
        ["Who founded Calgra? Orvel Tann. Where is it?", both], "off: both read with their turns"
    questions, given = model.knowledge.questions(prompts, model.copy.replace(alone_first=0.7), [ON_TOPIC] * 2)
    assert questions == ["Who founded Calgra? Orvel Tann. Where is it?", "Where is Calgra?"]
    assert list(given) == [questions[0]], "only the question read with its turns has answers already given"
    assert model.gate([elliptic, named], [ON_TOPIC] * 2, copy={"alone_first": 0.7}) == [True, True]
    assert model.knowledge.questions(prompts, model.copy.replace(alone_first=0.01), [ON_TOPIC] * 2)[0][1] == both, \
        "P(no answer) 0.05 alone is over 0.01: read with its turns"
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="alone_first must be in"):
            CopyConfig(alone_first=bad)


def test_gate_no_answer_turns_is_a_stricter_threshold_for_questions_read_with_their_turns():
    model = _model(gate_no_answer=0.7, gate_ramp=0.0, question_turns=3)
    model.answer_reader = QuestionsRead(0.5)
    turns = [{"role": "user", "content": "Who founded Calgra?"}, {"role": "assistant", "content": "Orvel Tann."},
             {"role": "user", "content": "Where is it?"}]
    single = "Where is Calgra?"
    assert model.gate([turns, single], [ON_TOPIC] * 2) == [True, True], "P(no answer) 0.5 is under 0.7"
    assert model.gate([turns, single], [ON_TOPIC] * 2, copy={"gate_no_answer_turns": 0.4}) == [False, True], \
        "0.5 is over 0.4 for the follow-up; the single question keeps the threshold of 0.7"
    assert model.gate([turns, single], [ON_TOPIC] * 2, copy={"gate_no_answer_turns": 0.4, "gate_no_answer": 1.0}) \
        == [False, True], "it needs no other threshold set"
    assert model.gate([turns], [ON_TOPIC], copy={"gate_no_answer_turns": 0.4, "question_turns": 1}) == [True], \
        "the last question read alone is not read with its turns"
    none = model.generate(turns, mode="none", max_new_tokens=6)
    assert model.generate(turns, ON_TOPIC, max_new_tokens=6, copy={"gate_no_answer_turns": 0.4}) == none
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="gate_no_answer_turns must be in"):
            CopyConfig(gate_no_answer_turns=bad)
