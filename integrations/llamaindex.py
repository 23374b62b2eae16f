"""LlamaIndex components: an LLM, a synthesizer, a retriever and an embedding, all thin.

``DiekaeLLM`` is a drop-in for ``VectorStoreIndex.as_query_engine(llm=DiekaeLLM())``: when a
prompt template carries retrieved text (``context_str`` / ``context_msg``), that text goes to
the encoders and only ``query_str`` (plus ``existing_answer`` when refining) reaches the
decoder. How the stock response modes behave:

- ``compact`` (default) / ``simple_summarize``: all retrieved chunks packed into one
  ``context_str`` -> one DIEKÆ call whose passages are that text's blank-line-separated blocks.
- ``refine`` (and ``compact`` when the chunks fill more than one call): the first chunk answers
  the question; each later chunk is knowledge for a call whose decoder question is the query plus
  the existing answer. Where the copy gate finds that the later chunk does not answer, the
  existing answer is kept, as the refine template asks ("If the context isn't useful, return the
  original answer").
- ``tree_summarize``: each packed chunk is answered with DIEKÆ; the answers then become the
  knowledge for the final call.

For exact per-passage input (one node = one passage) use :class:`DiekaeSynthesizer`.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple, Optional, Sequence

try:
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.base.llms.generic_utils import (astream_completion_response_to_chat_response,
                                                           completion_response_to_chat_response,
                                                           stream_completion_response_to_chat_response)
    from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                                  CompletionResponse, CompletionResponseAsyncGen,
                                                  CompletionResponseGen, LLMMetadata, MessageRole)
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate
    from llama_index.core.response_synthesizers import BaseSynthesizer
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.core.types import TokenAsyncGen, TokenGen
    from pydantic import PrivateAttr
except ImportError as exc:  # the framework is an extra
    raise ImportError(f"diekae_rag.integrations.llamaindex needs llama-index-core: "
                      f"pip install 'diekae-rag[llamaindex]' (or 'diekae-rag[all]'). ({exc})") from exc

from diekae_rag.model import DiekaeModel
from diekae_rag.passages import passage_texts, text_blocks
from diekae_rag.prompts import Question

from ._shared import copy_overrides, default_model, model_name

_CONTEXT_KEYS = ("context_str", "context_msg")
# LlamaIndex packs retrieved chunks into one context string with blank lines between them
# (PromptHelper.repack); each blank-line-separated block becomes its own passage (text_blocks), so
# chunks stay cacheable and the passage prior can weigh them.


# LlamaIndex counts tokens with its own tokenizer (tiktoken cl100k_base); the decoder's tokenizer
# needs at most 1.29x as many on English prose (1.03x median over 747 passages from examples/docs and
# SQuAD-Shifts; benchmarks/token_ratio.py). The context window leaves that margin, so packed
# chunks fit max_knowledge_tokens.
TOKENS_PER_LLAMAINDEX_TOKEN = 1.3


class TemplateCall(NamedTuple):
    """What a template call gives DIEKÆ: the decoder's question, the passages for the encoders, and
    a refine call's existing answer."""
    question: Optional[Question]
    knowledge: list[str]
    existing_answer: Optional[str] = None


def split_prompt_args(prompt: BasePromptTemplate, prompt_args: dict) -> TemplateCall:
    """(decoder question, knowledge passages, existing answer) from a template's partial and call
    arguments.

    The question is a conversation (chat turns) when a chat template carries earlier turns, as a
    chat engine's does. Returns ``(None, [], None)`` when the template carries no retrieved context.
    """
    args = {**getattr(prompt, "kwargs", {}), **prompt_args}
    context: list[str] = []
    for k in _CONTEXT_KEYS:
        v = args.get(k)
        for text in [v] if isinstance(v, str) else (v if isinstance(v, (list, tuple)) else []):
            if isinstance(text, str):  # simple_summarize passes a list of (truncated) chunks
                context += text_blocks(text)
    if not any(k in args for k in _CONTEXT_KEYS):
        return TemplateCall(None, [])
    blank = {**prompt_args, **{k: "" for k in _CONTEXT_KEYS}}
    question = args.get("query_str") or prompt.format(**blank)
    existing = (args.get("existing_answer") or "").strip() or None
    if existing:
        question = f"{question}\n(An earlier answer was: {existing})"
    if isinstance(prompt, ChatPromptTemplate):  # earlier turns stay turns; system messages carry the context
        turns = chat_turns(prompt.format_messages(**blank))
        if len(turns) > 1 and turns[-1]["role"] == "user":
            return TemplateCall(turns[:-1] + [{"role": "user", "content": question}], context, existing)
    return TemplateCall(question, context, existing)


def chat_turns(messages: Sequence[ChatMessage]) -> list[dict]:
    """LlamaIndex chat messages -> the decoder's chat turns (the decoder keeps the system prompt its
    encoders were trained with; see :func:`chat_knowledge` for what system messages carry)."""
    return [{"role": m.role.value, "content": m.content or ""} for m in messages
            if m.role in (MessageRole.USER, MessageRole.ASSISTANT)]


def chat_knowledge(messages: Sequence[ChatMessage], knowledge: Any = None) -> list[str]:
    """A chat call's passages: ``knowledge=`` (any passage form), then each system message's
    blank-line-separated blocks, so context put in a system message reaches the encoders."""
    return passage_texts(knowledge) + [b for m in messages if m.role == MessageRole.SYSTEM
                                       for b in text_blocks(m.content or "")]


class DiekaeLLM(CustomLLM):
    """A LlamaIndex LLM whose retrieved context goes to DIEKÆ encoders, not into the prompt.

    Responses carry token counts in ``additional_kwargs`` (``prompt_tokens``, ``completion_tokens``,
    ``total_tokens`` and ``knowledge_tokens``, the passage tokens the encoders read); a stream's
    last response carries them."""

    max_new_tokens: int = 128
    mode: str = "diekae"
    copy_settings: Optional[dict] = None  # CopyConfig fields for every call, e.g. {"gate_cosine": 0.3}
    on_no_answer: Optional[str] = None   # "decoder" or "abstain" where the copy gate closes
    _model: DiekaeModel = PrivateAttr()

    def __init__(self, *, model: Optional[DiekaeModel] = None, callback_manager: Optional[CallbackManager] = None,
                 **kwargs: Any) -> None:
        super().__init__(callback_manager=callback_manager, **kwargs)
        self._model = model if model is not None else default_model()

    @property
    def model(self) -> DiekaeModel:
        return self._model

    @classmethod
    def class_name(cls) -> str:
        return "DiekaeLLM"

    @property
    def context_window(self) -> int:
        """What LlamaIndex may pack into one call: the answer, plus the knowledge the encoders read
        (``max_knowledge_tokens``) in LlamaIndex's tokens. Passages never fill the decoder's prompt,
        so anything more would be cut."""
        return self.max_new_tokens + int(self._model.config.max_knowledge_tokens / TOKENS_PER_LLAMAINDEX_TOKEN)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=False, model_name=model_name(self._model))

    # -- completion and chat: an ordinary LLM over the prompt, knowledge only when given ---------
    def _call(self, question: Question, knowledge) -> tuple[tuple, dict]:
        return (question, knowledge), dict(mode=self.mode if knowledge else "none", max_new_tokens=self.max_new_tokens,
                                           copy=copy_overrides(self.copy_settings, self.on_no_answer))

    def _usage(self, args: tuple, call: dict, text: str) -> dict:
        u = self._model.usage(*args, text, mode=call["mode"])
        return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens, "knowledge_tokens": u.knowledge_tokens}

    def _answer(self, question: Question, knowledge) -> CompletionResponse:
        args, call = self._call(question, knowledge)
        text = self._model.generate(*args, **call)
        return CompletionResponse(text=text, additional_kwargs=self._usage(args, call, text))

    def _pieces(self, question: Question, knowledge) -> CompletionResponseGen:
        args, call = self._call(question, knowledge)
        text = ""
        for delta in self._model.stream(*args, **call):
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        yield CompletionResponse(text=text, delta="", additional_kwargs=self._usage(args, call, text))

    async def _apieces(self, question: Question, knowledge) -> CompletionResponseAsyncGen:
        args, call = self._call(question, knowledge)
        text = ""
        async for delta in self._model.astream(*args, **call):
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        yield CompletionResponse(text=text, delta="", additional_kwargs=self._usage(args, call, text))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._answer(prompt, kwargs.pop("knowledge", None))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._pieces(prompt, kwargs.pop("knowledge", None))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._answer, prompt, kwargs.pop("knowledge", None))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any
                               ) -> CompletionResponseAsyncGen:
        return self._apieces(prompt, kwargs.pop("knowledge", None))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(self._answer(chat_turns(messages), chat_knowledge(messages, kwargs.pop("knowledge", None))))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return stream_completion_response_to_chat_response(
            self._pieces(chat_turns(messages), chat_knowledge(messages, kwargs.pop("knowledge", None))))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return astream_completion_response_to_chat_response(
            self._apieces(chat_turns(messages), chat_knowledge(messages, kwargs.pop("knowledge", None))))

    # -- template calls from query and chat engines: context -> encoders, the rest -> decoder ----
    def _kept_answer(self, call: TemplateCall) -> Optional[str]:
        """A refine call's existing answer where the copy gate closes on the new context (it does not
        answer the question), else None: the call is answered."""
        if call.existing_answer is None or not call.knowledge or self.mode != "diekae":
            return None
        copy = copy_overrides(self.copy_settings, self.on_no_answer)
        return None if self._model.gate([call.question], [call.knowledge], copy=copy)[0] else call.existing_answer

    def predict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        call = split_prompt_args(prompt, prompt_args)
        if call.question is None:
            return super().predict(prompt, **prompt_args)
        kept = self._kept_answer(call)
        return kept if kept is not None else self._answer(call.question, call.knowledge).text

    def stream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenGen:
        call = split_prompt_args(prompt, prompt_args)
        if call.question is None:
            return super().stream(prompt, **prompt_args)
        kept = self._kept_answer(call)
        if kept is not None:
            return iter([kept])
        return (r.delta for r in self._pieces(call.question, call.knowledge) if r.delta)

    async def apredict(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        return await asyncio.to_thread(self.predict, prompt, **prompt_args)

    async def astream(self, prompt: BasePromptTemplate, **prompt_args: Any) -> TokenAsyncGen:
        call = split_prompt_args(prompt, prompt_args)
        if call.question is None:
            return await super().astream(prompt, **prompt_args)
        kept = await asyncio.to_thread(self._kept_answer, call)

        async def deltas() -> TokenAsyncGen:
            if kept is not None:
                yield kept
                return
            async for r in self._apieces(call.question, call.knowledge):
                if r.delta:
                    yield r.delta
        return deltas()


class DiekaeSynthesizer(BaseSynthesizer):
    """Each retrieved node is one passage for the encoders; ``source_nodes`` are kept."""

    def __init__(self, *, model: Optional[DiekaeModel] = None, max_new_tokens: int = 128,
                 streaming: bool = False, **kwargs: Any) -> None:
        self._model = model if model is not None else default_model()
        self._max_new_tokens = max_new_tokens
        super().__init__(llm=DiekaeLLM(model=self._model, max_new_tokens=max_new_tokens), streaming=streaming,
                         **kwargs)

    def _get_prompts(self) -> dict:
        return {}

    def _update_prompts(self, prompts: dict) -> None:
        return None

    def get_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any):
        passages = list(text_chunks)
        if self._streaming:
            return self._model.stream(query_str, passages, max_new_tokens=self._max_new_tokens)
        return self._model.generate(query_str, passages, max_new_tokens=self._max_new_tokens)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **kwargs: Any):
        return await asyncio.to_thread(self.get_response, query_str, text_chunks, **kwargs)


class DiekaeEmbedding(BaseEmbedding):
    """The embedded MiniLM (or any sentence-transformers folder) as a LlamaIndex embedding."""

    _embedder: Any = PrivateAttr()

    def __init__(self, *, embedder=None, **kwargs: Any) -> None:
        from diekae_rag.retrievers.embeddings import Embedder
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        self._embedder = embedder or Embedder()

    @classmethod
    def class_name(cls) -> str:
        return "DiekaeEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embedder.encode_queries([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embedder.encode([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embedder.encode(texts).tolist()

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


class DiekaeStoreRetriever(BaseRetriever):
    """A LlamaIndex retriever over a :class:`~diekae_rag.retrievers.PassageStore`."""

    def __init__(self, store, k: int = 5, **kwargs: Any) -> None:
        self._store = store
        self._k = k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        out = []
        for p in self._store.search(query_bundle.query_str, self._k):
            meta = {**p.metadata, "doc_id": p.doc_id}
            # The passage text alone reaches the encoders; metadata stays for citing sources.
            node = TextNode(text=p.text, id_=f"{p.doc_id}#{p.chunk_index}", metadata=meta,
                            excluded_llm_metadata_keys=list(meta), excluded_embed_metadata_keys=list(meta))
            out.append(NodeWithScore(node=node, score=p.score))
        return out
