"""The spec's security schemes: our keys (bearer token, api-key header) and OIDC access tokens (openIdConnect)."""

from __future__ import annotations

from typing import Any

from connexion.lifecycle import ConnexionRequest
from connexion.security import NO_VALUE, AbstractSecurityHandler

from llm_backend.config import Settings
from llm_backend.services.oidc import DISCOVERY_PATH, looks_like_jwt

OIDC_SCHEME = "oidcAuth"


async def _principal(token: str, request: ConnexionRequest) -> dict[str, Any] | None:
    state = request.scope["state"]
    principal: dict[str, Any] | None = await state["resources"].authenticate(
        token, state["caller"], request.headers
    )
    return principal


async def bearer_info(token: str, request: ConnexionRequest) -> Any:
    # A JWT is the oidcAuth scheme's to check when sign-in with tokens is on; without it, it is a wrong key.
    if looks_like_jwt(token) and request.scope["state"]["resources"].oidc is not None:
        return NO_VALUE
    return await _principal(token, request)


async def api_key_info(
    api_key: str, request: ConnexionRequest, required_scopes: Any = None
) -> dict[str, Any] | None:
    return await _principal(api_key, request)


async def oidc_info(token: str, request: ConnexionRequest) -> Any:
    """An OIDC access token (`Authorization: Bearer <jwt>`), checked against OIDC_ISSUER's keys."""
    state = request.scope["state"]
    oidc = state["resources"].oidc
    if oidc is None or not looks_like_jwt(token):
        return NO_VALUE
    principal: dict[str, Any] = await oidc(token, state["caller"], request.headers)
    return principal


class OpenIdConnectSecurityHandler(AbstractSecurityHandler):
    """Connexion's handler for `type: openIdConnect` (it has none of its own): the bearer token goes to the
    scheme's `x-oidcInfoFunc`; a request without a bearer token is left to the other schemes."""

    security_definition_key = "x-oidcInfoFunc"
    environ_key = "OIDCINFO_FUNC"

    def _get_verify_func(self, token_info_func: Any) -> Any:
        check = self._generic_check(token_info_func, "Provided token is not valid")

        def wrapper(request: Any) -> Any:
            auth_type, token = self.get_auth_header_value(request)
            if auth_type != "bearer":
                return NO_VALUE
            return check(request, token)

        return wrapper


SECURITY_MAP = {"openIdConnect": OpenIdConnectSecurityHandler}


def apply_oidc(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The spec as this server runs it: the oidcAuth scheme points at OIDC_ISSUER's discovery document, or,
    with OIDC sign-in off, is not offered at all (a JWT is then refused as a wrong key, as any other)."""
    schemes = spec.get("components", {}).get("securitySchemes", {})
    if OIDC_SCHEME not in schemes:
        return spec
    issuer = settings.oidc.issuer
    if issuer is not None:
        schemes[OIDC_SCHEME]["openIdConnectUrl"] = issuer.rstrip("/") + DISCOVERY_PATH
        return spec
    del schemes[OIDC_SCHEME]

    def without(requirements: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in requirements if OIDC_SCHEME not in r]

    if "security" in spec:
        spec["security"] = without(spec["security"])
    for item in spec.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict) and isinstance(op.get("security"), list):
                op["security"] = without(op["security"])
    return spec
