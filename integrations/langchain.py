"""LangChain components (langchain-core only): an LLM, a chat model, a retriever and a chain.

Passages travel as a side channel, ``passages=`` (strings or ``Document``s), the way Cohere's
chat model takes ``documents=``; they go to the encoders, never into the prompt::

    llm = DiekaeLLM()
    llm.invoke("Who is Marsul married to?", passages=["Marsul is married to Ithpelith."])
    chain = create_diekae_chain(DiekaeRetriever(store=store), llm)
    chain.invoke("Who is Marsul married to?")  # {"answer": ..., "source_documents": [...]}
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableGenerator
from langchain_core.runnables.utils import AddableDict
from pydantic import ConfigDict, Field

from diekae_rag.model import DiekaeModel

from ._shared import copy_overrides, default_model, passage_texts


class _DiekaeMixin:
    model: Optional[DiekaeModel] = Field(default=None, exclude=True)
    max_new_tokens: int = 128
    mode: str = "diekae"
    copy_settings: Optional[dict] = None  # CopyConfig fields for every call, e.g. {"gate_cosine": 0.3}
    on_no_answer: Optional[str] = None    # "decoder" or "abstain" where the copy gate closes

    def _diekae(self) -> DiekaeModel:
        if self.model is None:
            self.model = default_model()
        return self.model

    def _mode(self, passages: list[str]) -> str:
        return self.mode if passages or self.mode != "diekae" else "none"


class DiekaeLLM(_DiekaeMixin, LLM):
    """A LangChain LLM: ``invoke(question, passages=[...])``; streams with ``stream``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "diekae"

    def _call(self, prompt: str, stop: Optional[list[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        passages = passage_texts(kwargs.pop("passages", None))
        return self._diekae().generate(prompt, passages, mode=self._mode(passages), max_new_tokens=self.max_new_tokens,
                                       copy=copy_overrides(self.copy_settings, self.on_no_answer), stop=stop)

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        passages = passage_texts(kwargs.pop("passages", None))
        for delta in self._diekae().stream(prompt, passages, mode=self._mode(passages),
                                           max_new_tokens=self.max_new_tokens, stop=stop,
                                           copy=copy_overrides(self.copy_settings, self.on_no_answer)):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


class ChatDiekae(_DiekaeMixin, BaseChatModel):
    """A LangChain chat model; the last human message is the question, ``passages=`` the knowledge."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "diekae-chat"

    @staticmethod
    def _question(messages: list[BaseMessage]) -> str:
        turns = [m for m in messages if not isinstance(m, SystemMessage)]
        if not turns or not isinstance(turns[-1], HumanMessage):
            raise ValueError("ChatDiekae needs the last message to be a HumanMessage with the question.")
        if len(turns) == 1:
            return str(turns[-1].content)
        history = "\n".join(f"{'User' if isinstance(m, HumanMessage) else 'Assistant'}: {m.content}"
                            for m in turns[:-1])
        return f"Conversation so far:\n{history}\n\n{turns[-1].content}"

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        passages = passage_texts(kwargs.pop("passages", None))
        text = self._diekae().generate(self._question(messages), passages, mode=self._mode(passages),
                                       max_new_tokens=self.max_new_tokens, stop=stop,
                                       copy=copy_overrides(self.copy_settings, self.on_no_answer))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        passages = passage_texts(kwargs.pop("passages", None))
        for delta in self._diekae().stream(self._question(messages), passages, mode=self._mode(passages),
                                           max_new_tokens=self.max_new_tokens, stop=stop,
                                           copy=copy_overrides(self.copy_settings, self.on_no_answer)):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


class DiekaeRetriever(BaseRetriever):
    """A LangChain retriever over a :class:`~diekae_rag.retrievers.PassageStore`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    store: Any
    k: int = 5

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [Document(page_content=p.text, metadata={**p.metadata, "doc_id": p.doc_id,
                                                         "chunk_index": p.chunk_index, "score": p.score})
                for p in self.store.search(query, self.k)]


def create_diekae_chain(retriever: BaseRetriever, llm: Optional[DiekaeLLM | ChatDiekae] = None,
                        *, model: Optional[DiekaeModel] = None) -> Runnable:
    """question -> retrieve -> inject -> answer, as an LCEL runnable returning
    ``{"answer": str, "source_documents": list[Document]}``; supports invoke/stream/batch/ainvoke."""
    llm = llm or DiekaeLLM(model=model)

    def _question(inputs: Any) -> str:
        q = inputs.get("question") or inputs.get("query") if isinstance(inputs, dict) else inputs
        if not isinstance(q, str):
            raise ValueError("The chain's input is a question string or {'question': str}.")
        return q

    def transform(inputs: Iterator[Any]) -> Iterator[AddableDict]:
        for inp in inputs:
            question = _question(inp)
            docs = retriever.invoke(question)
            yield AddableDict(source_documents=docs)
            for chunk in llm.stream(question, passages=docs):
                yield AddableDict(answer=chunk.content if isinstance(chunk, BaseMessage) else chunk)

    async def atransform(inputs: AsyncIterator[Any]) -> AsyncIterator[AddableDict]:
        async for inp in inputs:
            chunks = await asyncio.to_thread(lambda: list(transform(iter([inp]))))
            for c in chunks:
                yield c

    return RunnableGenerator(transform, atransform, name="diekae_chain")


