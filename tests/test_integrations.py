"""LlamaIndex and LangChain end to end with the real SmolLM2, MiniLM and FAISS."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from diekae_rag.retrievers import PassageStore

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"
QUESTION = "Who is Marsul married to?"
NEW = 8


@contextlib.contextmanager
def spy(model):
    """Record every decoder prompt (prefill input) and every passage list given to the encoders."""
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
    try:
        yield prompts, knowledge
    finally:
        h.remove()
        del model.build_injection


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
    assert llm.metadata.context_window >= 32_000


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
