"""Microsoft Entra ID tokens for Azure OpenAI: DefaultAzureCredential, cached and refreshed early."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llm_backend.upstream.errors import UpstreamAuthFailed

logger = logging.getLogger(__name__)

SCOPE = "https://cognitiveservices.azure.com/.default"
# Microsoft documents this scope for the v1 API (`OpenAI(base_url=…/openai/v1/, api_key=token_provider)`).
V1_SCOPE = "https://ai.azure.com/.default"
REFRESH_MARGIN = 300.0  # seconds before expiry a token is renewed


def make_credential() -> Any:
    """Managed identity / workload identity on AKS, environment credentials, or the Azure CLI locally."""
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


class TokenProvider:
    """An async callable for the SDK's `azure_ad_token_provider`: one token shared by every request."""

    def __init__(self, credential: Any, scope: str = SCOPE) -> None:
        self.credential = credential
        self.scope = scope
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()
        self._scoped: dict[str, TokenProvider] = {scope: self}

    def scoped(self, scope: str) -> TokenProvider:
        """The provider of tokens for another scope, sharing this one's credential."""
        provider = self._scoped.get(scope)
        if provider is None:
            provider = self._scoped[scope] = TokenProvider(self.credential, scope)
            provider._scoped = self._scoped
        return provider

    async def __call__(self) -> str:
        if self._token is not None and time.time() < self._expires_on - REFRESH_MARGIN:
            return self._token
        async with self._lock:
            if self._token is None or time.time() >= self._expires_on - REFRESH_MARGIN:
                try:
                    access = await self.credential.get_token(self.scope)
                except Exception as exc:
                    logger.error("could not obtain an Entra ID token for Azure OpenAI: %s", exc)
                    raise UpstreamAuthFailed(
                        "this server could not obtain an Entra ID token for the upstream (check its managed "
                        "or workload identity); this is a server configuration problem, not the client's"
                    ) from None
                self._token, self._expires_on = access.token, float(access.expires_on)
                logger.info(
                    "obtained an Entra ID token for Azure OpenAI (valid until %s)", int(self._expires_on)
                )
        return self._token

    async def close(self) -> None:
        close = getattr(self.credential, "close", None)
        if close is not None:
            await close()
