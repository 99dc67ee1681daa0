"""Azure's v1 API inbound (/openai/v1/…): the OpenAI-style handlers, for `OpenAI(base_url=…/openai/v1/)`."""

from __future__ import annotations

from llm_backend.api.chat import create_chat_completion
from llm_backend.api.completions import create_completion
from llm_backend.api.embeddings import create_embedding
from llm_backend.api.models import list_models, retrieve_model
from llm_backend.api.responses import (
    cancel_response,
    count_input_tokens,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)

__all__ = [
    "cancel_response",
    "count_input_tokens",
    "create_chat_completion",
    "create_completion",
    "create_embedding",
    "create_response",
    "delete_response",
    "list_input_items",
    "list_models",
    "retrieve_model",
    "retrieve_response",
]
