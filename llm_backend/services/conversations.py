"""The chat-sessions service: conversations held by the server, continued by id, titled and exported."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from llm_backend.db.repositories import ConversationRepository, InvalidCursor
from llm_backend.db.session import session_scope
from llm_backend.errors import InvalidRequest, NotFound
from llm_backend.recording.records import Usage
from llm_backend.services.proxy import Admit, Caller, JsonResult, ProxyService, StreamResult
from llm_backend.upstream.base import CHAT

logger = logging.getLogger(__name__)

TITLE_PROMPT = (
    "Give this conversation a title of one to three words. Answer with the title only: no quotes, no "
    "punctuation at the end."
)
_PASSTHROUGH = {
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "stream_options",
    "n",
}


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


def conversation_json(conv: Any, *, messages: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": conv.id,
        "object": "conversation",
        "title": conv.title,
        "owner": conv.owner,
        "model": conv.model,
        "system_prompt": conv.system_prompt,
        "created_at": _iso(conv.created_at),
        "updated_at": _iso(conv.updated_at),
        "message_count": conv.message_count or 0,
        "usage": {
            "prompt_tokens": conv.prompt_tokens or 0,
            "completion_tokens": conv.completion_tokens or 0,
            "total_tokens": conv.total_tokens or 0,
        },
    }
    if messages:
        out["messages"] = [message_json(m) for m in conv.messages]
    return out


def message_json(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "object": "conversation.message",
        "position": m.position,
        **m.to_dict(),
        "request_id": m.request_id,
        "created_at": _iso(m.created_at),
    }


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                if p.get("type") == "text":
                    parts.append(str(p.get("text", "")))
                elif p.get("type") == "image_url":
                    parts.append(f"![image]({(p.get('image_url') or {}).get('url', '')})")
        return "\n".join(parts)
    return ""


def to_markdown(conv: dict[str, Any]) -> str:
    lines = [f"# {conv['title'] or 'Untitled conversation'}", ""]
    lines.append(f"- id: `{conv['id']}`")
    if conv.get("model"):
        lines.append(f"- model: {conv['model']}")
    lines.append(f"- created: {conv['created_at']}")
    lines.append(f"- tokens: {conv['usage']['total_tokens']}")
    lines.append("")
    if conv.get("system_prompt"):
        lines += ["## System", "", conv["system_prompt"], ""]
    for m in conv.get("messages", []):
        role = str(m.get("role", "")).capitalize()
        lines += [f"## {role}", ""]
        text = _text(m.get("content"))
        if text:
            lines.append(text)
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            lines.append(f"`{fn.get('name')}({fn.get('arguments', '')})`")
        lines.append("")
    return "\n".join(lines)


def clean_title(raw: str) -> str:
    title = raw.strip().splitlines()[0] if raw.strip() else ""
    title = re.sub(r"^(title\s*:\s*)", "", title, flags=re.IGNORECASE)
    title = title.strip(" \"'`*#.:;!?")
    words = title.split()
    return " ".join(words[:3])[:255] or "Untitled"


class ConversationService:
    """Conversations owned by keys (owner None when auth is off); the admin sees every one."""

    def __init__(self, engine: Any, proxy: ProxyService) -> None:
        self.engine = engine
        self.proxy = proxy

    @staticmethod
    def owner_filter(caller: Caller) -> str | None:
        """The owner a caller is confined to: its user (a user sees only their own conversations, from
        whichever key or front-end), else its key; None (all) for the admin or when auth is off."""
        return None if caller.is_admin else caller.user_id or caller.key_id

    @staticmethod
    def team_filter(caller: Caller) -> tuple[str, ...]:
        """The teams whose conversations a caller sees besides its own: those it administers."""
        member = caller.member
        return tuple(sorted(member.admin_of)) if member is not None and not caller.is_admin else ()

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return asyncio.to_thread(fn, *args, **kwargs)

    # -- CRUD ---------------------------------------------------------------------------------------------

    async def create(self, caller: Caller, data: Mapping[str, Any]) -> dict[str, Any]:
        model = data.get("model")
        if model is not None:
            self.proxy.resolve(caller, model)  # unknown or forbidden models fail now, not at the first turn

        def work() -> dict[str, Any]:
            with session_scope(self.engine, write=True) as session:
                conv = ConversationRepository(session).create(
                    title=data.get("title"),
                    owner=caller.user_id or caller.key_id,
                    team_id=caller.team_id,
                    model=model,
                    system_prompt=data.get("system_prompt"),
                )
                return conversation_json(conv, messages=True)

        result: dict[str, Any] = await self._run(work)
        return result

    def model_names(self, model: str | None) -> list[str] | None:
        """The names a model filter matches: the name as given, and its model's canonical name and aliases
        (a conversation is recorded under the canonical name whichever alias the client sent)."""
        if not model:
            return None
        names = [model]
        route = self.proxy.router.resolve(model)
        if route is not None and not route.config.wildcard:
            names += [n for n in (route.name, *route.config.aliases) if n not in names]
        return names

    async def list_conversations(self, caller: Caller, params: Mapping[str, Any]) -> dict[str, Any]:
        owner = self.owner_filter(caller)
        teams = self.team_filter(caller)
        if owner is None and params.get("owner"):
            owner = params["owner"]
        models = self.model_names(params.get("model"))

        def work() -> dict[str, Any]:
            with session_scope(self.engine) as session:
                try:
                    page = ConversationRepository(session).list(
                        owner=owner,
                        model=models,
                        created_from=params.get("created_after"),
                        created_to=params.get("created_before"),
                        q=params.get("q"),
                        limit=int(params.get("limit") or 20),
                        cursor=params.get("cursor"),
                        teams=teams,
                    )
                except InvalidCursor:
                    raise InvalidRequest("Invalid pagination cursor.", param="cursor") from None
                return {
                    "object": "list",
                    "data": [conversation_json(c) for c in page.items],
                    "has_more": page.next_cursor is not None,
                    "next_cursor": page.next_cursor,
                }

        result: dict[str, Any] = await self._run(work)
        return result

    def _get_sync(self, caller: Caller, conversation_id: str) -> dict[str, Any]:
        with session_scope(self.engine) as session:
            conv = ConversationRepository(session).get(
                conversation_id, owner=self.owner_filter(caller), teams=self.team_filter(caller)
            )
            if conv is None:
                raise NotFound(f"No conversation found with id '{conversation_id}'.", param="conversation_id")
            return conversation_json(conv, messages=True)

    async def get(self, caller: Caller, conversation_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(self._get_sync, caller, conversation_id)
        return result

    async def rename(self, caller: Caller, conversation_id: str, title: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            with session_scope(self.engine, write=True) as session:
                conv = ConversationRepository(session).rename(
                    conversation_id, title, owner=self.owner_filter(caller), teams=self.team_filter(caller)
                )
                if conv is None:
                    raise NotFound(
                        f"No conversation found with id '{conversation_id}'.", param="conversation_id"
                    )
                return conversation_json(conv)

        result: dict[str, Any] = await self._run(work)
        return result

    async def delete(self, caller: Caller, conversation_id: str) -> dict[str, Any]:
        def work() -> None:
            with session_scope(self.engine, write=True) as session:
                if not ConversationRepository(session).delete(
                    conversation_id, owner=self.owner_filter(caller), teams=self.team_filter(caller)
                ):
                    raise NotFound(
                        f"No conversation found with id '{conversation_id}'.", param="conversation_id"
                    )

        await self._run(work)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    async def export(self, caller: Caller, conversation_id: str, fmt: str) -> tuple[str, bytes]:
        conv = await self.get(caller, conversation_id)
        if fmt == "markdown":
            return "text/markdown; charset=utf-8", to_markdown(conv).encode()
        return "application/json", orjson.dumps(conv, option=orjson.OPT_INDENT_2)

    # -- turns --------------------------------------------------------------------------------------------

    def _history(self, conv: dict[str, Any]) -> list[dict[str, Any]]:
        history: list[dict[str, Any]] = []
        messages = conv["messages"]
        # A threaded conversation holds its system prompt as its first message too: send it once.
        leads = bool(messages) and messages[0].get("role") in ("system", "developer")
        if conv.get("system_prompt") and not leads:
            history.append({"role": "system", "content": conv["system_prompt"]})
        for m in messages:
            msg = {
                k: m[k]
                for k in ("role", "content", "name", "tool_calls", "tool_call_id")
                if m.get(k) is not None
            }
            history.append(msg)
        return history

    def _store_turn(
        self,
        conversation_id: str,
        messages: list[dict[str, Any]],
        usage: Usage,
        request_id: str,
        title: str | None,
    ) -> None:
        with session_scope(self.engine, write=True) as session:
            repo = ConversationRepository(session)
            conv = repo.get(conversation_id)
            if conv is None:  # deleted while the model was answering
                logger.info("conversation %s was deleted during a turn; reply not stored", conversation_id)
                return
            repo.append_messages(
                conv,
                messages,
                request_id=request_id,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            )
            if not conv.title and title:
                conv.title = title

    async def post_message(
        self, caller: Caller, conversation_id: str, data: Mapping[str, Any], admit: Admit | None
    ) -> tuple[JsonResult | StreamResult, dict[str, Any] | None]:
        content = data.get("content")
        role = data.get("role", "user")
        if role not in ("user", "tool"):
            raise InvalidRequest("Only 'user' (or 'tool') messages can be appended.", param="role")
        if role == "tool" and not data.get("tool_call_id"):
            raise InvalidRequest(
                "A 'tool' message needs the 'tool_call_id' it answers.", param="tool_call_id"
            )
        conv = await self.get(caller, conversation_id)
        model = data.get("model") or conv.get("model")
        if not model:
            raise InvalidRequest(
                "This conversation has no model: pass 'model' in the request (or set it at creation).",
                param="model",
            )
        new_message: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            new_message["tool_call_id"] = data.get("tool_call_id")
        body: dict[str, Any] = {k: v for k, v in data.items() if k in _PASSTHROUGH}
        body.update(model=model, messages=[*self._history(conv), new_message])
        stream = bool(data.get("stream"))
        if stream:
            body["stream"] = True
        caller.conversation_id = conversation_id
        title = None if conv.get("title") else _text(content)[:60] or None

        async def on_reply(reply: dict[str, Any] | None, usage: Usage, outcome: str) -> None:
            if reply is None or (not reply.get("content") and not reply.get("tool_calls")):
                return
            await self._run(
                self._store_turn, conversation_id, [new_message, reply], usage, caller.request_id, title
            )

        result = await self.proxy.forward(
            CHAT, body, caller, admit=admit, record_messages=False, on_reply=on_reply if stream else None
        )
        if isinstance(result, StreamResult):
            return result, None
        data_out = orjson.loads(result.content)
        choice = (data_out.get("choices") or [{}])[0]
        reply = choice.get("message") or {"role": "assistant", "content": None}
        usage_raw = data_out.get("usage") or {}
        usage = Usage(
            int(usage_raw.get("prompt_tokens") or 0),
            int(usage_raw.get("completion_tokens") or 0),
            int(usage_raw.get("total_tokens") or 0),
        )
        clean_reply = {k: reply[k] for k in ("role", "content", "tool_calls") if reply.get(k) is not None}
        await self._run(
            self._store_turn, conversation_id, [new_message, clean_reply], usage, caller.request_id, title
        )
        return result, {
            "conversation_id": conversation_id,
            "object": "conversation.turn",
            "request_id": caller.request_id,
            "model": data_out.get("model", model),
            "message": clean_reply,
            "finish_reason": choice.get("finish_reason"),
            "usage": usage_raw,
        }

    async def make_title(
        self, caller: Caller, conversation_id: str, data: Mapping[str, Any], admit: Admit | None
    ) -> dict[str, Any]:
        conv = await self.get(caller, conversation_id)
        model = data.get("model") or conv.get("model")
        if not model:
            raise InvalidRequest("This conversation has no model: pass 'model'.", param="model")
        transcript = "\n".join(
            f"{m['role']}: {_text(m.get('content'))[:500]}" for m in conv["messages"][:10] if m.get("content")
        )
        if not transcript:
            raise InvalidRequest("The conversation has no messages to title yet.", param="conversation_id")
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": TITLE_PROMPT},
                {"role": "user", "content": transcript},
            ],
            "max_tokens": 16,
            "temperature": 0.2,
        }
        result = await self.proxy.forward(CHAT, body, caller, admit=admit, record_messages=False)
        assert isinstance(result, JsonResult)
        reply = (orjson.loads(result.content).get("choices") or [{}])[0].get("message") or {}
        title = clean_title(_text(reply.get("content")))
        return await self.rename(caller, conversation_id, title)
