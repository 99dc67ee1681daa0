"""The Responses API: create (pinned to the owner of `previous_response_id`), and calls on stored responses."""

from __future__ import annotations

from typing import Any

from llm_backend.db.ids import new_uuid7
from llm_backend.db.session import DatabaseUnavailable
from llm_backend.errors import NotFound, ServiceUnavailable
from llm_backend.services.affinity import Owner, ResponseOwners
from llm_backend.services.flight import Admit, Caller, Flight, JsonResult, StreamResult
from llm_backend.services.operations import (
    CANCEL_OP,
    DELETE_OP,
    INPUT_ITEMS_OP,
    RESPONSES_INPUT_TOKENS_OP,
    RESPONSES_OP,
    RETRIEVE_OP,
    Operation,
)
from llm_backend.services.proxy import ProxyService

# query parameters of the stored-response calls that go upstream (never api-version, never stream)
_PASSED_QUERY = frozenset(
    {"include", "include[]", "limit", "order", "after", "before", "include_obfuscation"}
)


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    what = "Previous response" if param == "previous_response_id" else "Response"
    return NotFound(
        f"{what} with id '{response_id}' not found.",
        param=param,
        code="previous_response_not_found" if param else "not_found",
    )


class ResponsesService:
    """Creates responses through the proxy and remembers where each stored one lives."""

    def __init__(self, proxy: ProxyService, owners: ResponseOwners) -> None:
        self.proxy = proxy
        self.owners = owners

    def _visible(self, owner: Owner, caller: Caller) -> bool:
        return caller.is_admin or owner.key_id == caller.owner

    async def _find(self, response_id: str) -> Owner | None:
        try:
            return await self.owners.find(response_id)
        except DatabaseUnavailable:
            guard = self.owners.guard
            retry = guard.retry_after_s if guard is not None else 1
            raise ServiceUnavailable(
                "The database that knows where stored responses live is unreachable; try again shortly.",
                code="database_unavailable",
                headers={"Retry-After": str(retry)},
            ) from None

    async def _pin(self, flight: Flight, previous: str) -> Owner:
        """Send the flight to the backend that holds `previous` (a 404 when that is unknown to the caller)."""
        owner = await self._find(previous)
        if owner is None or not self._visible(owner, flight.caller):
            raise _not_found(previous, "previous_response_id")
        states = self.proxy.router.states
        route = flight.route
        # the same backend under the model the request names, or under the one that created the response
        state = (states.get(f"{route.name}/{owner.backend}") if route is not None else None) or states.get(
            f"{owner.model}/{owner.backend}"
        )
        if state is None:
            raise _not_found(previous, "previous_response_id")
        flight.state = state
        flight.pinned = previous
        return owner

    async def create(
        self,
        body: dict[str, Any],
        caller: Caller,
        *,
        raw: bytes | None = None,
        admit: Admit | None = None,
        model: str | None = None,
    ) -> JsonResult | StreamResult:
        previous = body.get("previous_response_id")
        stored = body.get("store") is not False
        proxy = self.proxy

        async def prepare(flight: Flight) -> None:
            if isinstance(previous, str) and previous:
                owner = await self._pin(flight, previous)
                if owner.conversation_id and not caller.conversation_id:
                    flight.conversation_id = owner.conversation_id
                    flight.continues = True
            elif proxy.accounts.record_content and caller.record_messages and not flight.conversation_id:
                flight.conversation_id = new_uuid7()  # the chain's conversation: exact threading
            if stored:
                flight.on_response = self._remember

        return await proxy.forward(
            RESPONSES_OP, body, caller, raw=raw, admit=admit, model=model, prepare=prepare
        )

    def _remember(self, flight: Flight, response: dict[str, Any]) -> None:
        response_id = response.get("id")
        if not isinstance(response_id, str) or flight.state is None or flight.route is None:
            return
        if response.get("store") is False:
            return
        self.owners.remember(
            Owner(
                response_id,
                flight.route.name,
                flight.state.name,
                flight.caller.owner,
                flight.conversation_id,
            )
        )

    async def count_input_tokens(
        self, body: dict[str, Any], caller: Caller, *, raw: bytes | None = None, admit: Admit | None = None
    ) -> JsonResult | StreamResult:
        previous = body.get("previous_response_id")
        proxy = self.proxy

        async def prepare(flight: Flight) -> None:
            if isinstance(previous, str) and previous:
                await self._pin(flight, previous)

        return await proxy.forward(
            RESPONSES_INPUT_TOKENS_OP, body, caller, raw=raw, admit=admit, prepare=prepare
        )

    async def _stored(
        self,
        op: Operation,
        method: str,
        response_id: str,
        suffix: str,
        caller: Caller,
        query: dict[str, Any] | None,
        admit: Admit | None,
    ) -> JsonResult:
        try:
            owner = await self._find(response_id)
        except ServiceUnavailable as exc:
            self.proxy.reject(caller, op, exc)
            raise
        if owner is None or not self._visible(owner, caller):
            error = _not_found(response_id)
            self.proxy.reject(caller, op, error)
            raise error
        passed = {k: str(v) for k, v in (query or {}).items() if k in _PASSED_QUERY and v is not None}
        return await self.proxy.call_stored(
            op,
            caller,
            model=owner.model,
            backend=owner.backend,
            response_id=response_id,
            method=method,
            path=f"responses/{response_id}{suffix}",
            query=passed or None,
            admit=admit,
        )

    async def retrieve(
        self, response_id: str, caller: Caller, query: Any = None, admit: Admit | None = None
    ) -> JsonResult:
        return await self._stored(RETRIEVE_OP, "GET", response_id, "", caller, query, admit)

    async def delete(self, response_id: str, caller: Caller, admit: Admit | None = None) -> JsonResult:
        return await self._stored(DELETE_OP, "DELETE", response_id, "", caller, None, admit)

    async def cancel(self, response_id: str, caller: Caller, admit: Admit | None = None) -> JsonResult:
        return await self._stored(CANCEL_OP, "POST", response_id, "/cancel", caller, None, admit)

    async def input_items(
        self, response_id: str, caller: Caller, query: Any = None, admit: Admit | None = None
    ) -> JsonResult:
        return await self._stored(INPUT_ITEMS_OP, "GET", response_id, "/input_items", caller, query, admit)
