"""LangChain's own conformance suite (langchain-tests) on ChatDiekae, with the real SmolLM2.

Tool calling, structured output, JSON mode and multimodal input are declared unsupported.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from diekae_rag.integrations.langchain import ChatDiekae


class _Params:
    @property
    def chat_model_class(self) -> type[ChatDiekae]:
        return ChatDiekae

    @property
    def chat_model_params(self) -> dict:
        return {"max_new_tokens": 24}

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:  # the model is a DiekaeModel object, not a name
        return False


class TestChatDiekaeUnit(_Params, ChatModelUnitTests):
    pass


@pytest.mark.real
class TestChatDiekaeIntegration(_Params, ChatModelIntegrationTests):
    pass
