"""One converter takes passages in every form users hold: str, the store's Passage, LlamaIndex
nodes and LangChain Documents."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_model
from diekae_rag.passages import passage_text, passage_texts, text_blocks
from diekae_rag.retrievers import Passage

QUESTION = "Who is Marsul married to?"
TEXTS = ["Marsul is married to Ithpelith.", "Calgra is a river town."]


def forms() -> dict[str, list]:
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, TextNode
    return {
        "str": list(TEXTS),
        "Passage": [Passage(text=t, score=0.5, doc_id="d.md", chunk_index=i) for i, t in enumerate(TEXTS)],
        "TextNode": [TextNode(text=t, metadata={"file_name": "d.md"}) for t in TEXTS],
        "NodeWithScore": [NodeWithScore(node=TextNode(text=t), score=0.5) for t in TEXTS],
        "Document": [Document(page_content=t, metadata={"source": "d.md"}) for t in TEXTS],
    }


@pytest.mark.parametrize("form", ["str", "Passage", "TextNode", "NodeWithScore", "Document"])
def test_every_form_gives_the_passages_text(form):
    passages = forms()[form]
    assert passage_texts(passages) == TEXTS
    assert passage_texts(tuple(passages)) == TEXTS
    assert passage_texts(passages[0]) == TEXTS[:1], "one passage alone is a list of one"


@pytest.mark.parametrize("form", ["Passage", "TextNode", "NodeWithScore", "Document"])
def test_generate_score_and_gate_answer_alike_for_every_form(form):
    model = tiny_model()
    passages = forms()[form]
    want = model.generate(QUESTION, TEXTS, max_new_tokens=4)
    assert model.generate(QUESTION, passages, max_new_tokens=4) == want
    assert "".join(model.stream(QUESTION, passages, max_new_tokens=4)).strip() == want
    assert model.score(QUESTION, "Ithpelith", passages) == pytest.approx(model.score(QUESTION, "Ithpelith", TEXTS))
    assert model.generate_batch([QUESTION, QUESTION], [passages, TEXTS], max_new_tokens=4) == [want, want]


def test_anything_else_is_refused_with_the_forms_named():
    with pytest.raises(TypeError, match="Cannot use a int as a passage: pass str, diekae_rag.retrievers.Passage"):
        passage_text(3)
    with pytest.raises(TypeError, match="knowledge must be a list of passages"):
        passage_texts({"text": 1})
    assert passage_texts(None) == []


def test_text_blocks_split_a_joined_context_back_into_chunks():
    assert text_blocks("a b\n\n  \nc\nd\n\n") == ["a b", "c\nd"]
    assert text_blocks("   ") == []


@pytest.mark.parametrize("module,extra", [("langchain", "langchain"), ("llamaindex", "llamaindex")])
def test_an_integration_without_its_framework_names_the_extra(module, extra):
    blocked = {"langchain": "langchain_core", "llamaindex": "llama_index"}[module]
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"import diekae_rag.integrations.{module}")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and f"pip install 'diekae-rag[{extra}]'" in run.stderr, run.stderr
