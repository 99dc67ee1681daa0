"""Runs in .venv-clients (not under pytest): LlamaIndex's OpenAI, Azure OpenAI and embedding classes, used as
their documentation shows, against the llm-backend at argv[1] with the key in LLM_BACKEND_KEY. Prints one
JSON object of what came back, for tests/clients/test_llamaindex.py to check."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import llama_index.core
import openai
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.utils import get_tokenizer
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.azure_openai import AzureOpenAI
from llama_index.llms.openai import OpenAI

BASE, KEY = sys.argv[1], os.environ["LLM_BACKEND_KEY"]
CHAT_MODEL, AZURE_MODEL, EMBEDDING_MODEL, COMPLETION_MODEL = sys.argv[2:6]
MESSAGES = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Say hello")]


async def run_async(llm: OpenAI) -> dict[str, object]:
    chat = await llm.achat(MESSAGES)
    deltas = [part.delta or "" async for part in await llm.astream_chat(MESSAGES)]
    complete = await llm.acomplete("Say hello")
    return {"achat": chat.message.content, "astream_chat": deltas, "acomplete": complete.text}


def main() -> None:
    out: dict[str, object] = {}
    llm = OpenAI(model=CHAT_MODEL, api_base=f"{BASE}/v1", api_key=KEY, max_retries=0)
    out["context_window"] = llm.metadata.context_window
    out["chat"] = llm.chat(MESSAGES).message.content
    out["stream_chat"] = [part.delta or "" for part in llm.stream_chat(MESSAGES)]
    out["complete"] = llm.complete("Say hello").text
    out["stream_complete"] = [part.delta or "" for part in llm.stream_complete("Say hello")]
    out.update(asyncio.run(run_async(llm)))

    azure = AzureOpenAI(
        engine=AZURE_MODEL,
        model="gpt-4o",
        azure_endpoint=BASE,
        api_key=KEY,
        api_version="2024-10-21",
        max_retries=0,
    )
    out["azure_chat"] = azure.chat(MESSAGES).message.content
    out["azure_stream_chat"] = [part.delta or "" for part in azure.stream_chat(MESSAGES)]
    out["azure_achat"] = asyncio.run(azure.achat(MESSAGES)).message.content

    embed = OpenAIEmbedding(model=EMBEDDING_MODEL, api_base=f"{BASE}/v1", api_key=KEY, max_retries=0)
    out["embedding"] = embed.get_text_embedding("Hello")
    out["embeddings"] = embed.get_text_embedding_batch(["a", "b", "c"])
    out["aembedding"] = asyncio.run(embed.aget_query_embedding("Hello"))

    # The code paths that read tiktoken's encoding files, which tiktoken downloads on first use: offline, the
    # global tokenizer finds them in llama-index-core's own copy; a completion model's tokenizer needs
    # TIKTOKEN_CACHE_DIR pointed at that copy (as the README says).
    out["tokens"] = len(get_tokenizer()("Hello, world"))
    os.environ.setdefault(
        "TIKTOKEN_CACHE_DIR", str(Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache")
    )
    instruct = OpenAI(model=COMPLETION_MODEL, api_base=f"{BASE}/v1", api_key=KEY, max_retries=0)
    out["legacy_complete"] = instruct.complete("Say hello").text  # /v1/completions, max_tokens from tiktoken
    out["gpt_4o_tokens"] = len(llm._tokenizer.encode("Hello, world")) if llm._tokenizer else 0

    # a wrong key: the SDK's own error, with our OpenAI-shaped body
    wrong = OpenAI(model=CHAT_MODEL, api_base=f"{BASE}/v1", api_key=os.environ["WRONG_KEY"], max_retries=0)
    try:
        wrong.chat(MESSAGES)
        out["wrong_key"] = "accepted"
    except openai.AuthenticationError as exc:
        out["wrong_key"] = [exc.status_code, exc.code]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
