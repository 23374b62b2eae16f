"""LangChain components (langchain-core only): an LLM, a chat model, a retriever and a chain.

Passages travel as a side channel, ``passages=`` (strings or ``Document``s), the way Cohere's
chat model takes ``documents=``; they go to the encoders, never into the prompt::

    llm = DiekaeLLM()
    llm.invoke("Who is Marsul married to?", passages=["Marsul is married to Ithpelith."])
    chain = create_diekae_chain(DiekaeRetriever(store=store), llm)
    chain.invoke("Who is Marsul married to?")  # {"answer": ..., "source_documents": [...]}
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

try:
    from langchain_core.callbacks import (AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun,
                                          CallbackManagerForRetrieverRun)
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel, LangSmithParams
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
    from langchain_core.messages.ai import UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableGenerator
    from langchain_core.runnables.utils import AddableDict
    from pydantic import ConfigDict, Field
except ImportError as exc:  # the framework is an extra
    raise ImportError(f"diekae_rag.integrations.langchain needs langchain-core: "
                      f"pip install 'diekae-rag[langchain]' (or 'diekae-rag[all]'). ({exc})") from exc

from diekae_rag.model import DiekaeModel
from diekae_rag.passages import passage_texts, text_blocks

from ._shared import copy_overrides, default_model, model_name


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

    def _call_args(self, question, kwargs: dict, stop: Optional[list[str]]) -> tuple[tuple, dict]:
        """``(question, passages)`` and the model's keyword arguments for one call."""
        passages = passage_texts(kwargs.pop("passages", None))
        mode = self.mode if passages or self.mode != "diekae" else "none"
        return (question, passages), dict(mode=mode, max_new_tokens=self.max_new_tokens, stop=stop,
                                          copy=copy_overrides(self.copy_settings, self.on_no_answer))

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        override = kwargs.get("model")
        params["ls_model_name"] = override if isinstance(override, str) else model_name(self.model)
        params["ls_max_tokens"] = self.max_new_tokens
        return params


class DiekaeLLM(_DiekaeMixin, LLM):
    """A LangChain LLM: ``invoke(question, passages=[...])``; streams with ``stream`` and ``astream``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "diekae"

    def _call(self, prompt: str, stop: Optional[list[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        args, call = self._call_args(prompt, kwargs, stop)
        return self._diekae().generate(*args, **call, **kwargs)

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        args, call = self._call_args(prompt, kwargs, stop)
        for delta in self._diekae().stream(*args, **call, **kwargs):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any
                       ) -> AsyncIterator[GenerationChunk]:
        args, call = self._call_args(prompt, kwargs, stop)
        async for delta in self._diekae().astream(*args, **call, **kwargs):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk


class ChatDiekae(_DiekaeMixin, BaseChatModel):
    """A LangChain chat model. Human and AI messages reach the decoder as chat turns (the last
    human message is the question); ``passages=`` is the knowledge. A system message's text goes to the
    encoders as knowledge too, one passage per blank-line-separated block, so the context that the
    canonical RAG chain formats into a system message is read, not dropped (the decoder keeps the system
    prompt its encoders were trained with). Usage metadata counts the decoder's input and output tokens,
    and the passage tokens the encoders read (``input_token_details["knowledge"]``)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @property
    def _llm_type(self) -> str:
        return "diekae-chat"

    @staticmethod
    def _conversation(messages: list[BaseMessage]) -> tuple[list[dict], list[str]]:
        """The decoder's chat turns, and the passages that system messages carry."""
        system = [b for m in messages if isinstance(m, SystemMessage) for b in text_blocks(str(m.text))]
        turns = [m for m in messages if not isinstance(m, SystemMessage)]
        if not turns or not isinstance(turns[-1], HumanMessage):
            raise ValueError("ChatDiekae needs the last message to be a HumanMessage with the question.")
        out = []
        for m in turns:
            if not isinstance(m, (HumanMessage, AIMessage)):
                raise ValueError(f"ChatDiekae reads human, AI and system messages only, got {type(m).__name__}.")
            out.append({"role": "user" if isinstance(m, HumanMessage) else "assistant", "content": str(m.text)})
        return out, system

    def _chat_args(self, messages: list[BaseMessage], kwargs: dict, stop: Optional[list[str]]
                   ) -> tuple[tuple, dict]:
        turns, system = self._conversation(messages)
        kwargs["passages"] = passage_texts(kwargs.get("passages")) + system
        return self._call_args(turns, kwargs, stop)

    def _usage(self, args: tuple, mode: str, text: str) -> UsageMetadata:
        u = self._diekae().usage(*args, text, mode=mode)
        return UsageMetadata(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                             total_tokens=u.input_tokens + u.output_tokens,
                             input_token_details={"knowledge": u.knowledge_tokens})

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        args, call = self._chat_args(messages, kwargs, stop)
        text = self._diekae().generate(*args, **call, **kwargs)
        message = AIMessage(content=text, usage_metadata=self._usage(args, call["mode"], text),
                            response_metadata={"model_name": model_name(self.model)})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, delta: str) -> ChatGenerationChunk:
        return ChatGenerationChunk(message=AIMessageChunk(content=delta))

    def _last_chunk(self, args: tuple, call: dict, text: str) -> ChatGenerationChunk:
        """The stream's closing chunk: no text, the usage of the whole answer (as OpenAI's streams end)."""
        return ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=self._usage(args, call["mode"], text), chunk_position="last",
            response_metadata={"model_name": model_name(self.model)}))

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        args, call = self._chat_args(messages, kwargs, stop)
        text = ""
        for delta in self._diekae().stream(*args, **call, **kwargs):
            text += delta
            chunk = self._chunk(delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(args, call, text)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        args, call = self._chat_args(messages, kwargs, stop)
        text = ""
        async for delta in self._diekae().astream(*args, **call, **kwargs):
            text += delta
            chunk = self._chunk(delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(args, call, text)


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
    ``{"answer": str, "source_documents": list[Document]}``; supports invoke/stream/batch and their
    async forms, which stream each piece as it is generated."""
    llm = llm or DiekaeLLM(model=model)

    def _question(inputs: Any) -> str:
        q = inputs.get("question") or inputs.get("query") if isinstance(inputs, dict) else inputs
        if not isinstance(q, str):
            raise ValueError("The chain's input is a question string or {'question': str}.")
        return q

    def _answer(chunk) -> AddableDict:
        return AddableDict(answer=chunk.content if isinstance(chunk, BaseMessage) else chunk)

    def transform(inputs: Iterator[Any]) -> Iterator[AddableDict]:
        for inp in inputs:
            question = _question(inp)
            docs = retriever.invoke(question)
            yield AddableDict(source_documents=docs)
            for chunk in llm.stream(question, passages=docs):
                yield _answer(chunk)

    async def atransform(inputs: AsyncIterator[Any]) -> AsyncIterator[AddableDict]:
        async for inp in inputs:
            question = _question(inp)
            docs = await retriever.ainvoke(question)
            yield AddableDict(source_documents=docs)
            async for chunk in llm.astream(question, passages=docs):
                yield _answer(chunk)

    return RunnableGenerator(transform, atransform, name="diekae_chain")
