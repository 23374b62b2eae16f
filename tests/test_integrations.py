"""LlamaIndex and LangChain end to end with the real SmolLM2, MiniLM and FAISS."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from pathlib import Path

import pytest

from diekae_rag.copy import GATE_OFF
from diekae_rag.retrievers import PassageStore

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"
QUESTION = "Who is Marsul married to?"
NEW = 8


@contextlib.contextmanager
def spy(model):
    """Record every decoder prompt (prefill input) and every passage list given to the encoders, or to
    the copy gate alone (a LlamaIndex refine call that keeps its existing answer where the gate closes)."""
    prompts, knowledge = [], []
    base = model.decoder.get_decoder()

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prompts.extend(model.tokenizer.batch_decode(ids, skip_special_tokens=True))

    h = base.register_forward_pre_hook(pre, with_kwargs=True)
    orig = model.build_injection

    def build(prompts_ids, passages, mask, answers=None, **kwargs):
        knowledge.extend(passages)
        return orig(prompts_ids, passages, mask, answers, **kwargs)

    model.build_injection = build
    gate = model.gate

    def gate_alone(questions, knowledges, copy=None):
        knowledge.extend(knowledges)
        return gate(questions, knowledges, copy)

    model.gate = gate_alone
    try:
        yield prompts, knowledge
    finally:
        h.remove()
        del model.build_injection, model.gate


@pytest.fixture(scope="module")
def store(real_embedder):
    s = PassageStore(real_embedder)
    s.sync_folder(DOCS, progress=False)
    return s


def _assert_passages_only_in_encoders(prompts, knowledge, needle="Ithpelith"):
    assert prompts, "the decoder ran"
    assert knowledge and any(needle in p for ps in knowledge for p in ps), "the encoders got the passage"
    for p in prompts:
        assert "Marsul Vantrel is a glassmaker" not in p and "weaver from Calgra" not in p, p


@pytest.mark.parametrize("response_mode", ["compact", "refine", "simple_summarize", "tree_summarize"])
def test_llamaindex_query_engine_response_modes(real_model, real_embedder, response_mode):
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from diekae_rag.integrations.llamaindex import DiekaeEmbedding, DiekaeLLM

    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DOCS)).load_data(),
                                            embed_model=DiekaeEmbedding(embedder=real_embedder))
    engine = index.as_query_engine(llm=DiekaeLLM(model=real_model, max_new_tokens=NEW),
                                   response_mode=response_mode, similarity_top_k=2)
    with spy(real_model) as (prompts, knowledge):
        response = engine.query(QUESTION)
    assert str(response).strip()
    assert len(response.source_nodes) == 2
    _assert_passages_only_in_encoders(prompts, knowledge)
    assert any(QUESTION in p for p in prompts)
    if response_mode in ("compact", "simple_summarize"):  # packed chunks are split back into passages
        assert len(knowledge[0]) >= 2 and not any("\n\n" in p for p in knowledge[0]), knowledge[0]


def test_llamaindex_refine_keeps_the_existing_answer_where_the_new_context_does_not_answer(real_model):
    """A refine call (``refine``, or ``compact`` over more than one call) whose new context the copy gate
    closes on returns the existing answer, as the refine template asks, in every call form; one whose
    context answers is answered by DIEKAE with that context."""
    from llama_index.core.prompts.default_prompts import DEFAULT_REFINE_PROMPT
    from diekae_rag.integrations.llamaindex import DiekaeLLM, split_prompt_args

    async def collect(gen):
        return "".join([d async for d in await gen])

    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    existing = "Ithpelith, a weaver from Calgra."
    off_topic = "The Thornvale line crosses the river Velm on the Hundred Arch Bridge."
    args = dict(query_str=QUESTION, existing_answer=existing, context_msg=off_topic)
    call = split_prompt_args(DEFAULT_REFINE_PROMPT, args)
    assert call.existing_answer == existing and call.knowledge == [off_topic]
    assert real_model.gate([call.question], [call.knowledge]) == [False]
    assert llm.predict(DEFAULT_REFINE_PROMPT, **args) == existing
    assert "".join(llm.stream(DEFAULT_REFINE_PROMPT, **args)) == existing
    assert asyncio.run(collect(llm.astream(DEFAULT_REFINE_PROMPT, **args))) == existing
    answering = {**args, "context_msg": "Marsul is married to Ithpelith."}
    call = split_prompt_args(DEFAULT_REFINE_PROMPT, answering)
    assert real_model.gate([call.question], [call.knowledge]) == [True]
    assert llm.predict(DEFAULT_REFINE_PROMPT, **answering) == real_model.generate(
        call.question, call.knowledge, max_new_tokens=NEW)


def test_llamaindex_synthesizer_gets_each_node_as_a_passage(real_model, store):
    from llama_index.core.query_engine import RetrieverQueryEngine
    from diekae_rag.integrations.llamaindex import DiekaeStoreRetriever, DiekaeSynthesizer

    engine = RetrieverQueryEngine(retriever=DiekaeStoreRetriever(store, k=3),
                                  response_synthesizer=DiekaeSynthesizer(model=real_model, max_new_tokens=NEW))
    with spy(real_model) as (prompts, knowledge):
        response = engine.query(QUESTION)
    assert [n.node.get_content() for n in response.source_nodes] == knowledge[0]  # text only, no metadata
    assert len(knowledge[0]) == 3
    _assert_passages_only_in_encoders(prompts, knowledge)


def test_llamaindex_plain_complete_is_an_ordinary_llm(real_model):
    from diekae_rag.integrations.llamaindex import DiekaeLLM
    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    assert llm.complete("What is 2 + 2?").text == real_model.generate("What is 2 + 2?", mode="none",
                                                                       max_new_tokens=NEW)



def test_llamaindex_packing_fits_what_the_encoders_read(real_model, real_embedder):
    """A stock query engine over prose chunks (k=5, about 3,000 tokens) packs no more per call than the
    encoders read: no KnowledgeTruncatedWarning, and every retrieved chunk still reaches the encoders."""
    from llama_index.core import Document, VectorStoreIndex
    from diekae_rag.data.negatives import closed_book
    from diekae_rag.integrations.llamaindex import DiekaeEmbedding, DiekaeLLM
    from diekae_rag.prompts import KnowledgeTruncatedWarning

    paragraphs = list(dict.fromkeys(p for item in closed_book("dev") for p in item.passages))[:60]
    docs = [Document(text="\n\n".join(paragraphs[i: i + 3])) for i in range(0, 60, 3)]
    index = VectorStoreIndex.from_documents(docs, embed_model=DiekaeEmbedding(embedder=real_embedder))
    engine = index.as_query_engine(llm=DiekaeLLM(model=real_model, max_new_tokens=NEW), similarity_top_k=5)
    with warnings.catch_warnings(), spy(real_model) as (prompts, knowledge):
        warnings.simplefilter("error", KnowledgeTruncatedWarning)
        response = engine.query("What did the president of France's soccer federation decide?")
    budget = real_model.config.max_knowledge_tokens
    retrieved = sum(len(real_model.prompter.ids(n.node.get_content())) for n in response.source_nodes)
    assert retrieved > 2 * budget, "the retrieved chunks are more than one call can read"
    assert all(sum(len(real_model.prompter.ids(p)) for p in ps) <= budget for ps in knowledge)
    read = " ".join(p for ps in knowledge for p in ps)
    for n in response.source_nodes:  # nothing dropped: each paragraph reached the encoders (or the gate) in a call
        assert all(par.strip()[:80] in read for par in n.node.get_content().split("\n\n")), "a chunk was lost"


CONVERSATION = [("Who is Marsul Vantrel married to?", "Ithpelith Quorne."), ("Where was she born?", None)]


def test_chat_history_reaches_the_decoder_as_turns(real_model):
    """The second question needs the first: the bare decoder resolves "she" only with the history."""
    turns = [{"role": "user", "content": CONVERSATION[0][0]}, {"role": "assistant", "content": CONVERSATION[0][1]},
             {"role": "user", "content": CONVERSATION[1][0]}]
    with_history = real_model.generate(turns, mode="none", max_new_tokens=16)
    alone = real_model.generate(CONVERSATION[1][0], mode="none", max_new_tokens=16)
    assert "Ithpelith" in with_history and "Ithpelith" not in alone, (with_history, alone)
    with pytest.raises(ValueError, match="end with a non-empty user turn"):
        real_model.generate(turns[:2])
    with pytest.raises(TypeError, match="role"):
        real_model.generate([{"role": "system", "content": "x"}, turns[-1]])


def _history_in_prompt(prompts: list[str]) -> None:
    first_q, first_a = CONVERSATION[0]
    assert any(first_q in p and first_a in p and p.index(first_q) < p.index(first_a) < p.index(CONVERSATION[1][0])
               for p in prompts), prompts
    assert not any("Conversation so far" in p for p in prompts)


def test_langchain_chat_keeps_turns_and_reports_usage(real_model):
    from langchain_core.messages import AIMessage, HumanMessage
    from diekae_rag.integrations.langchain import ChatDiekae

    passages = ["Ithpelith Quorne was born in Davrenholt, a river town."]
    # The copy gate can close on a follow-up that names no one ("Where was she born?"; README,
    # Limitations). This test is about turns and usage: gate off.
    chat = ChatDiekae(model=real_model, max_new_tokens=NEW,
                      copy_settings=GATE_OFF)
    messages = [HumanMessage(CONVERSATION[0][0]), AIMessage(CONVERSATION[0][1]), HumanMessage(CONVERSATION[1][0])]
    with spy(real_model) as (prompts, knowledge):
        reply = chat.invoke(messages, passages=passages)
    _history_in_prompt(prompts)
    assert knowledge == [passages] and reply.content.strip()
    usage = reply.usage_metadata
    turns, _ = ChatDiekae._conversation(messages)
    assert usage["input_tokens"] == len(real_model.prompter.prompt_ids(turns))
    assert usage["output_tokens"] == len(real_model.prompter.ids(reply.content)) > 0
    assert usage["input_token_details"]["knowledge"] == len(real_model.prompter.ids(passages[0]))
    assert chat._get_ls_params()["ls_model_name"] == "diekae:embedded:SmolLM2-135M-Instruct"
    chunks = list(chat.stream(messages, passages=passages))
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.content == reply.content and streamed.usage_metadata == usage


def test_llamaindex_chat_engine_keeps_turns_and_reports_usage(real_model, real_embedder):
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from diekae_rag.integrations.llamaindex import DiekaeEmbedding, DiekaeLLM

    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DOCS)).load_data(),
                                            embed_model=DiekaeEmbedding(embedder=real_embedder))
    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    engine = index.as_chat_engine(chat_mode="context", llm=llm, similarity_top_k=2)
    engine.chat(CONVERSATION[0][0])
    first_answer = str(engine.chat_history[-1].content)
    with spy(real_model) as (prompts, knowledge):
        engine.chat(CONVERSATION[1][0])
    assert any(first_answer in p and CONVERSATION[0][0] in p for p in prompts), prompts
    _assert_passages_only_in_encoders(prompts, knowledge, needle="Marsul")
    usage = llm.complete(QUESTION, knowledge=["Marsul is married to Ithpelith."]).additional_kwargs
    assert usage["knowledge_tokens"] == len(real_model.prompter.ids("Marsul is married to Ithpelith.")) > 0
    assert usage["prompt_tokens"] == len(real_model.prompter.prompt_ids(QUESTION)) and usage["completion_tokens"] > 0
    last = list(llm.stream_complete(QUESTION, knowledge=["Marsul is married to Ithpelith."]))[-1]
    assert last.additional_kwargs == usage


def test_langchain_chain_end_to_end(real_model, store):
    from langchain_core.documents import Document
    from diekae_rag.integrations.langchain import DiekaeLLM, DiekaeRetriever, create_diekae_chain

    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    chain = create_diekae_chain(DiekaeRetriever(store=store, k=2), llm)
    with spy(real_model) as (prompts, knowledge):
        out = chain.invoke(QUESTION)
    assert set(out) == {"answer", "source_documents"}
    assert all(isinstance(d, Document) for d in out["source_documents"])
    assert out["source_documents"][0].metadata["doc_id"] == "marsul_vantrel.md"
    _assert_passages_only_in_encoders(prompts, knowledge)
    direct = real_model.generate(QUESTION, [d.page_content for d in out["source_documents"]], max_new_tokens=NEW)
    assert out["answer"].strip() == direct
    chunks = list(chain.stream(QUESTION))
    assert "".join(c.get("answer", "") for c in chunks).strip() == direct
    assert asyncio.run(chain.ainvoke(QUESTION))["answer"].strip() == direct
    assert [o["answer"].strip() for o in chain.batch([QUESTION, QUESTION])] == [direct, direct]


def test_langchain_models_take_passages_side_channel(real_model):
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage
    from diekae_rag.integrations.langchain import ChatDiekae, DiekaeLLM

    passages = [Document(page_content="Marsul is married to Ithpelith.")]
    want = real_model.generate(QUESTION, ["Marsul is married to Ithpelith."], max_new_tokens=NEW)
    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    assert llm.invoke(QUESTION, passages=passages) == want
    assert "".join(llm.stream(QUESTION, passages=passages)).strip() == want
    chat = ChatDiekae(model=real_model, max_new_tokens=NEW)
    assert chat.invoke([HumanMessage(QUESTION)], passages=passages).content == want
    assert "".join(c.content for c in chat.stream(QUESTION, passages=passages)).strip() == want
    with pytest.raises(ValueError, match="HumanMessage"):
        chat.invoke([])


CANONICAL_QUESTIONS = {  # examples/docs: question -> a word of the answer
    "Who is Marsul married to?": "Ithpelith",
    "When was Calgra founded?": "1432",
    "How many people does the Thornvale Railway Company employ?": "2,300",
}


def test_langchain_canonical_rag_chain_with_chat_diekae_answers_from_its_context(real_model, store):
    """LangChain's own RAG chain, the context formatted into a system message: ChatDiekae reads that
    context (as passages for the encoders), so it is neither dropped nor put in the decoder's prompt."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from diekae_rag.integrations.langchain import ChatDiekae, DiekaeRetriever

    def format_docs(docs):
        return "\n\n".join(d.page_content for d in docs)

    prompt = ChatPromptTemplate.from_messages([
        ("system", "Use the following pieces of retrieved context to answer the question.\n\n{context}"),
        ("human", "{question}")])
    retriever = DiekaeRetriever(store=store, k=3)
    chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
             | prompt | ChatDiekae(model=real_model, max_new_tokens=16) | StrOutputParser())
    for question, word in CANONICAL_QUESTIONS.items():
        with spy(real_model) as (prompts, knowledge):
            answer = chain.invoke(question)
        from diekae_rag.passages import text_blocks
        blocks = [b for d in retriever.invoke(question) for b in text_blocks(d.page_content)]
        assert all(b in knowledge[0] for b in blocks), "each retrieved chunk's blocks reach the encoders"
        _assert_passages_only_in_encoders(prompts, knowledge, needle=word)
        assert word in answer, (question, answer)
        bare = real_model.generate(question, mode="none", max_new_tokens=16)
        assert word not in bare, "the bare decoder does not know it: the answer came from the context"


def test_llamaindex_chat_reads_system_messages_as_knowledge(real_model):
    from llama_index.core.base.llms.types import ChatMessage, MessageRole
    from diekae_rag.integrations.llamaindex import DiekaeLLM

    llm = DiekaeLLM(model=real_model, max_new_tokens=NEW)
    context = "Context:\n\nMarsul is married to Ithpelith."
    with spy(real_model) as (_, knowledge):
        reply = llm.chat([ChatMessage(role=MessageRole.SYSTEM, content=context),
                          ChatMessage(role=MessageRole.USER, content=QUESTION)])
    assert knowledge == [["Context:", "Marsul is married to Ithpelith."]]
    assert reply.message.content == real_model.generate(QUESTION, ["Context:", "Marsul is married to Ithpelith."],
                                                        max_new_tokens=NEW)


def test_generate_takes_the_stores_passages_as_they_are(real_model, store):
    found = store.search(QUESTION, k=5)
    assert real_model.generate(QUESTION, found, max_new_tokens=NEW) == real_model.generate(
        QUESTION, [p.text for p in found], max_new_tokens=NEW)
