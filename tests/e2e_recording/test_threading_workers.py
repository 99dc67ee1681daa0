"""Threading through the running server: fast chats over four gunicorn workers are one conversation each.

A UI sends a chat's next turn (an agent its tool-call round) milliseconds after the previous answer, and
another worker may answer it. Each worker records write-behind, so the next turn's record is often written
before the previous one's: threading must come out the same whatever order the workers write in.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from llm_backend.db.models import RequestLog
from tests.conftest import gunicorn_server, gunicorn_worker_pids
from tests.e2e_recording.conftest import conversations, count_rows, request_rows, wait_for

CHATS = 50
TURNS = 3
WORKERS = 4


def _chat(base: str, i: int) -> list[dict[str, Any]]:
    """One chat the way a UI sends it: the whole history each turn, back to back, no pause."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    history: list[dict[str, Any]] = [{"role": "system", "content": f"You help with chat {i}."}]
    try:
        for turn in range(TURNS):
            history.append({"role": "user", "content": f"Chat {i}, question {turn + 1}?"})
            if turn == 1 and i % 2:  # some UIs stream: the thread must not care
                text = "".join(
                    chunk.choices[0].delta.content or ""
                    for chunk in client.chat.completions.create(model="mock", messages=history, stream=True)  # type: ignore[arg-type]
                    if chunk.choices
                )
            else:
                answer = client.chat.completions.create(model="mock", messages=history)  # type: ignore[arg-type]
                text = answer.choices[0].message.content or ""
            history.append({"role": "assistant", "content": text})
    finally:
        client.close()
    return history


@pytest.mark.fault
def test_fifty_fast_three_turn_chats_over_four_workers_are_fifty_conversations(
    db_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: mock\n    backends:\n      - provider: mock\n")
    env = {
        **os.environ,
        "WEB_CONCURRENCY": str(WORKERS),
        "LLM_BACKEND_CONFIG": str(config),
        "LLM_BACKEND_AUTH": "none",
        "DATABASE_URL": db_url,
        "LLM_BACKEND_DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "WARNING",
    }
    with gunicorn_server(env, tmp_path / "gunicorn.log", timeout=60) as (proc, base):
        wait_for(lambda: len(gunicorn_worker_pids(proc)) >= WORKERS, 30, f"{WORKERS} gunicorn workers")
        with ThreadPoolExecutor(max_workers=CHATS) as pool:
            chats = list(pool.map(lambda i: _chat(base, i), range(CHATS)))
        wait_for(lambda: count_rows(db_url, RequestLog) >= CHATS * TURNS, 60, "every request recorded")
        # the recorder writes a chat's rows and its conversation in one transaction: all are there now
    convs = conversations(db_url)
    by_system = {c["messages"][0]["content"]: c for c in convs if c["messages"]}
    assert len(convs) == CHATS, sorted((c["title"], c["message_count"]) for c in convs)
    for history in chats:
        conv = by_system[history[0]["content"]]
        assert [(m["role"], m["content"]) for m in conv["messages"]] == [
            (m["role"], m["content"]) for m in history
        ]
        assert [m["position"] for m in conv["messages"]] == list(range(len(history)))
        assert conv["message_count"] == len(history)
        assert conv["system_prompt"] == history[0]["content"]
        assert conv["parent_hash"] is None  # nothing of it is waiting for an earlier turn any more
    # every request row points at its chat's conversation, three per chat
    rows = request_rows(db_url)
    per_conversation: dict[str, int] = {}
    for row in rows:
        per_conversation[row["conversation_id"]] = per_conversation.get(row["conversation_id"], 0) + 1
    assert per_conversation == {c["id"]: TURNS for c in convs}
