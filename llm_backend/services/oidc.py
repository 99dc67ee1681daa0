"""OIDC sign-in: the provider's discovery document, a per-worker cache of its keys, and token validation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from llm_backend.config import OidcSettings
from llm_backend.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from llm_backend.logthrottle import LogThrottle

logger = logging.getLogger(__name__)
_throttle = LogThrottle(logger, 60.0)


class _LazyJwt:
    """PyJWT, imported when a token is first looked at: it loads `cryptography`, megabytes that a worker
    without OIDC sign-in never needs."""

    def __getattr__(self, name: str) -> Any:
        import jwt as module

        globals()["jwt"] = module
        return getattr(module, name)


if TYPE_CHECKING:
    import jwt
else:
    jwt = _LazyJwt()

DISCOVERY_PATH = "/.well-known/openid-configuration"
MAX_DOCUMENT_BYTES = 1024 * 1024  # a discovery document or key set larger than this is refused
RETRY_AFTER_FAILURE_S = 5.0  # after a failed fetch the provider is not asked again for this long
monotonic = time.monotonic  # the clock of the key cache (tests replace it)
TENANT_PLACEHOLDER = "{tenantid}"
_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# Entra ID: v2.0 tokens say https://login.microsoftonline.com/{tenant}/v2.0, v1.0 ones https://sts.windows.net/
# {tenant}/ (per cloud); an app registration's accessTokenAcceptedVersion decides which its API receives.
_ENTRA_V2 = re.compile(rf"^(?P<base>https?://[^/]+)/(?P<tenant>{_GUID}|\{{tenantid\}})/v2\.0/?$")
_ENTRA_V1 = re.compile(rf"^(?P<base>https?://[^/]+)/(?P<tenant>{_GUID}|\{{tenantid\}})/?$")
_V1_BASE = {
    "https://login.microsoftonline.com": "https://sts.windows.net",
    "https://login.microsoftonline.us": "https://login.microsoftonline.us",
    "https://login.partner.microsoftonline.cn": "https://sts.chinacloudapi.cn",
}
_V2_BASE = {v: k for k, v in _V1_BASE.items()}
GRAPH_AUDIENCES = frozenset({"00000003-0000-0000-c000-000000000000", "https://graph.microsoft.com"})
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller whose token the provider signed: `subject` is Entra's `oid` if present, else `sub`."""

    subject: str
    issuer: str
    tenant: str | None
    email: str | None
    name: str | None
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    # the token does not list the groups: Entra ID left them out (too many: `_claim_names`, `hasgroups`)
    groups_overage: bool = False


# -- errors ---------------------------------------------------------------------------------------------


def _shown(value: Any, limit: int = 120) -> str:
    """A claim from an unverified token, safe to put in a message: printable, short."""
    text = _PRINTABLE.sub("?", str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TokenRejected(AuthenticationFailed):
    """A bearer token that is not a valid token of our provider for this server (401)."""

    def __init__(self, message: str, **kw: Any) -> None:
        # a header value: ASCII, no quotes or backslashes to break out of the quoted string
        description = message.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "/")
        headers = {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'}
        super().__init__(message, code=kw.pop("code", "invalid_api_key"), headers=headers, **kw)


class TokenForbidden(PermissionDenied):
    """A valid token whose holder may not use this server (another tenant, unknown groups): 403."""

    def __init__(self, message: str, *, code: str) -> None:
        headers = {"WWW-Authenticate": 'Bearer error="insufficient_scope"'}
        super().__init__(message, code=code, headers=headers)


class ProviderUnavailable(ServiceUnavailable):
    """The identity provider's discovery document or keys cannot be had: tokens cannot be checked (503)."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            code="identity_provider_unavailable",
            headers={"Retry-After": str(math.ceil(RETRY_AFTER_FAILURE_S))},
        )


class FetchFailed(Exception):
    """A call to the identity provider failed; the message says how (never a secret)."""


# -- talking to the provider ------------------------------------------------------------------------------

HttpGet = Callable[[str], Awaitable[dict[str, Any]]]


class ProviderHttp:
    """The worker's HTTP client for the provider: JSON documents in, form posts out, each with a timeout."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._session: Any = None

    def _client(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers={"Accept": "application/json", "User-Agent": "llm-backend-oidc"},
            )
        return self._session

    async def get_json(self, url: str) -> dict[str, Any]:
        status, data = await self._call("GET", url)
        if status != 200:
            raise FetchFailed(f"GET {url} answered {status}")
        return data

    async def post_form(
        self, url: str, form: Mapping[str, str], *, auth: tuple[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        return await self._call("POST", url, form=form, auth=auth)

    async def _call(
        self,
        method: str,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        import aiohttp
        import orjson

        basic = aiohttp.BasicAuth(*auth) if auth is not None else None
        try:
            async with self._client().request(method, url, data=form, auth=basic) as response:
                raw = await response.content.read(MAX_DOCUMENT_BYTES + 1)
                status = response.status
        except TimeoutError:
            raise FetchFailed(f"{method} {url} timed out after {self.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"{method} {url} failed: {type(exc).__name__}: {_shown(exc)}") from None
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise FetchFailed(f"{method} {url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise FetchFailed(f"{method} {url} answered {status} with a body that is not JSON") from None
        if not isinstance(data, dict):
            raise FetchFailed(f"{method} {url} answered JSON that is not an object")
        return status, data

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- the provider's signing keys --------------------------------------------------------------------------


def _kty_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """The JWK's type matches the algorithm the token names (RS*/PS*: RSA; ES*: EC of the right curve)."""
    kty = jwk.get("kty")
    if alg.startswith(("RS", "PS")):
        return kty == "RSA"
    if alg.startswith("ES"):
        curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}.get(alg)
        return kty == "EC" and jwk.get("crv") == curve
    if alg == "EdDSA":
        return kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448")
    return False


class KeySet:
    """The provider's JWKS, cached per worker.

    Requests never wait for the network except: the first use (nothing cached yet), and a token signed
    with a key id the cache does not know, which triggers one refetch, at most once per `min_refresh_s`
    (a flood of made-up key ids costs the provider one request per interval, not one each). One fetch is
    in flight at a time; every request that needs it waits for that one. Keys older than `ttl_s` are
    fetched again in the background while the cached ones keep serving; a failed background fetch keeps
    them. A failed fetch is not retried for RETRY_AFTER_FAILURE_S.
    """

    def __init__(
        self,
        load: Callable[[], Awaitable[dict[str, Any]]],
        *,
        ttl_s: float,
        min_refresh_s: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._load = load
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.clock = clock or (lambda: monotonic())
        self._by_kid: dict[str | None, list[dict[str, Any]]] = {}
        self._parsed: dict[tuple[int, str], Any] = {}
        self._loaded_at: float | None = None
        self._failed_at: float | None = None
        self._failure = ""
        self._last_demand = -math.inf
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # JWKS fetches attempted by this worker

    @property
    def loaded(self) -> bool:
        return self._loaded_at is not None

    def _start(self) -> asyncio.Task[None]:
        if self._task is None:
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._task = task

            def done(t: asyncio.Task[None]) -> None:
                self._task = None
                if not t.cancelled():
                    t.exception()  # retrieved: a background fetch's failure is logged in _fetch

            task.add_done_callback(done)
        return self._task

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            document = await self._load()
            by_kid = self.parse(document)
        except ProviderUnavailable as exc:
            self._failed(exc.message)
            raise
        except (FetchFailed, ValueError) as exc:
            self._failed(str(exc))
            raise ProviderUnavailable(
                "The identity provider's signing keys cannot be fetched, so the token cannot be checked; "
                "retry shortly."
            ) from None
        self._by_kid = by_kid
        self._parsed = {}
        self._loaded_at = self.clock()
        self._failed_at = None
        logger.info("OIDC signing keys loaded: %d key(s)", sum(len(v) for v in by_kid.values()))

    def _failed(self, why: str) -> None:
        self._failed_at = self.clock()
        self._failure = why
        _throttle.log("jwks", logging.WARNING, "OIDC signing keys could not be fetched: %s", why)

    @staticmethod
    def parse(document: Mapping[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise ValueError("the JWKS document has no `keys` list")
        by_kid: dict[str | None, list[dict[str, Any]]] = {}
        for key in keys:
            if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
                continue
            if key.get("use", "sig") != "sig":  # encryption keys sign nothing
                continue
            kid = key.get("kid")
            by_kid.setdefault(kid if isinstance(kid, str) else None, []).append(key)
        return by_kid

    async def _wait(self) -> None:
        await asyncio.shield(self._start())

    async def candidates(self, kid: str | None) -> list[dict[str, Any]]:
        """The keys a token with this key id may be signed with ([] when the provider publishes none)."""
        now = self.clock()
        recently_failed = self._failed_at is not None and now - self._failed_at < RETRY_AFTER_FAILURE_S
        if self._loaded_at is None:
            if recently_failed and self._task is None:
                raise ProviderUnavailable(
                    "The identity provider's signing keys cannot be fetched, so the token cannot be checked; "
                    "retry shortly."
                )
            await self._wait()
        elif now - self._loaded_at >= self.ttl_s and not recently_failed:
            self._start()  # in the background: the cached keys serve meanwhile
        if kid is None:
            return [k for keys in self._by_kid.values() for k in keys]
        found = self._by_kid.get(kid)
        if found:
            return found
        if self._task is not None:
            await self._wait()
        elif now - self._last_demand >= self.min_refresh_s:
            self._last_demand = now
            await self._wait()
        return self._by_kid.get(kid, [])

    def key_for(self, jwk: dict[str, Any], alg: str) -> Any:
        """The public key object of a JWK for `alg`, parsed once per key set; None if it is not usable."""
        cache_key = (id(jwk), alg)
        if cache_key not in self._parsed:
            try:
                self._parsed[cache_key] = jwt.PyJWK(jwk, algorithm=alg).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                self._parsed[cache_key] = None
        return self._parsed[cache_key]

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# -- which issuers and tenants are ours -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuerPolicy:
    """The `iss` values tokens may carry, from the discovery document's issuer.

    A plain issuer must match exactly. An Entra ID one (…/{tenant}/v2.0) also accepts its tenant's v1.0
    issuer (https://sts.windows.net/{tenant}/): the keys are the same. A multi-tenant discovery document
    names the issuer `{tenantid}`: then the tenant comes from the token and must be an allowed one.
    """

    issuer: str
    v2_base: str | None = None  # Entra: https://login.microsoftonline.com (of the cloud)
    v1_base: str | None = None  # Entra: https://sts.windows.net (of the cloud)
    tenant: str | None = None  # Entra: the one tenant; None with a {tenantid} template
    allowed_tenants: frozenset[str] = frozenset()  # lower-case ids; "*" any (templates only)

    @classmethod
    def of(cls, issuer: str, allowed_tenants: Iterable[str]) -> IssuerPolicy:
        allowed = frozenset(t.lower() for t in allowed_tenants)
        if (m := _ENTRA_V2.match(issuer)) is not None:
            base = m["base"]
            v1 = _V1_BASE.get(base.lower(), base)
        elif (m := _ENTRA_V1.match(issuer)) is not None and m["base"].lower() in _V2_BASE:
            v1 = m["base"]
            base = _V2_BASE[v1.lower()]
        else:
            return cls(issuer=issuer)
        tenant = m["tenant"].lower()
        return cls(
            issuer=issuer,
            v2_base=base,
            v1_base=v1,
            tenant=None if tenant == TENANT_PLACEHOLDER else tenant,
            allowed_tenants=allowed,
        )

    @property
    def entra(self) -> bool:
        return self.v2_base is not None

    def tenant_of(self, iss: str) -> str | None:
        """The tenant an Entra-shaped `iss` of our cloud names; None when `iss` is not of that shape."""
        assert self.v2_base is not None and self.v1_base is not None
        for pattern in (_ENTRA_V2, _ENTRA_V1):
            m = pattern.match(iss)
            if m is None or m["tenant"] == TENANT_PLACEHOLDER:
                continue
            if m["base"].lower() in (self.v2_base.lower(), self.v1_base.lower()):
                return m["tenant"].lower()
        return None

    def canonical(self, tenant: str | None) -> str:
        """The one issuer a user of `tenant` is known by, whichever token version it came with."""
        if self.v2_base is not None and tenant is not None:
            return f"{self.v2_base}/{tenant}/v2.0"
        return self.issuer

    def classify(self, iss: Any) -> tuple[bool, str | None] | None:
        """(tenant accepted, tenant) for an issuer of our provider; None for any other issuer."""
        if not isinstance(iss, str):
            return None
        if not self.entra:
            return (True, None) if iss.rstrip("/") == self.issuer.rstrip("/") else None
        tenant = self.tenant_of(iss)
        if tenant is None:
            return None
        if self.tenant is not None:
            return tenant == self.tenant, tenant
        return ("*" in self.allowed_tenants or tenant in self.allowed_tenants), tenant


# -- the provider ---------------------------------------------------------------------------------------


def _timestamp(value: Any) -> str:
    try:
        return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unreadable time"


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def identity_of(claims: Mapping[str, Any], tenant: str | None, kind: str = "access token") -> Identity:
    """The Identity a verified token's claims describe."""
    subject = claims.get("oid") if isinstance(claims.get("oid"), str) and claims.get("oid") else None
    if subject is None:
        sub = claims.get("sub")
        subject = sub if isinstance(sub, str) and sub else None
    if subject is None:
        raise TokenRejected(f"The {kind} names no subject (neither `oid` nor `sub`).")
    email = next(
        (
            v
            for v in (claims.get(c) for c in ("email", "upn", "preferred_username", "unique_name"))
            if isinstance(v, str) and v
        ),
        None,
    )
    name = claims.get("name") if isinstance(claims.get("name"), str) else None
    if not name:
        parts = [claims.get(c) for c in ("given_name", "family_name")]
        name = " ".join(p for p in parts if isinstance(p, str) and p) or None
    claim_names = claims.get("_claim_names")
    overage = bool(claims.get("hasgroups")) or (isinstance(claim_names, dict) and "groups" in claim_names)
    tid = claims.get("tid")
    return Identity(
        subject=subject,
        issuer=str(claims.get("iss")),
        tenant=tenant or (tid.lower() if isinstance(tid, str) and tid else None),
        email=email,
        name=name,
        groups=_strings(claims.get("groups")),
        roles=_strings(claims.get("roles")),
        groups_overage=overage,
    )


class OidcProvider:
    """One OIDC provider (OIDC_ISSUER): its discovery document and keys, and the checks of its tokens."""

    def __init__(
        self,
        settings: OidcSettings,
        *,
        http: ProviderHttp | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        assert settings.issuer is not None
        self.settings = settings
        self.http = http or ProviderHttp(settings.http_timeout_s)
        self.clock = clock or (lambda: monotonic())
        self.discovery_url = settings.issuer.rstrip("/") + DISCOVERY_PATH
        self._metadata: dict[str, Any] | None = None
        self._metadata_failed_at: float | None = None
        self._metadata_task: asyncio.Task[dict[str, Any]] | None = None
        self.policy: IssuerPolicy | None = None
        self.algorithms = frozenset(settings.algorithms)
        self.keys = KeySet(
            self._load_keys, ttl_s=settings.jwks_ttl_s, min_refresh_s=settings.jwks_min_refresh_s, clock=clock
        )

    # discovery

    async def metadata(self) -> dict[str, Any]:
        """The discovery document, fetched once per worker (503 while it cannot be had)."""
        if self._metadata is not None:
            return self._metadata
        failed = self._metadata_failed_at
        if self._metadata_task is None:
            if failed is not None and self.clock() - failed < RETRY_AFTER_FAILURE_S:
                raise ProviderUnavailable(
                    "The identity provider cannot be reached, so the token cannot be checked; retry shortly."
                )
            task = asyncio.get_running_loop().create_task(self._discover())
            self._metadata_task = task

            def done(t: asyncio.Task[dict[str, Any]]) -> None:
                self._metadata_task = None
                if not t.cancelled():
                    t.exception()

            task.add_done_callback(done)
        return await asyncio.shield(self._metadata_task)

    async def _discover(self) -> dict[str, Any]:
        try:
            document = await self.http.get_json(self.discovery_url)
            self.policy = self._check_discovery(document)
        except (FetchFailed, ValueError) as exc:
            self._metadata_failed_at = self.clock()
            _throttle.log("discovery", logging.WARNING, "OIDC discovery failed: %s", exc)
            raise ProviderUnavailable(
                "The identity provider cannot be reached, so the token cannot be checked; retry shortly."
            ) from None
        self._metadata = document
        logger.info("OIDC provider %s discovered", document["issuer"])
        return document

    def _check_discovery(self, document: Mapping[str, Any]) -> IssuerPolicy:
        issuer = document.get("issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(issuer, str) or not issuer:
            raise ValueError(f"{self.discovery_url} names no issuer")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError(f"{self.discovery_url} names no jwks_uri")
        configured = self.settings.issuer or ""
        policy = IssuerPolicy.of(issuer, self.settings.allowed_tenants)
        # OpenID Connect Discovery: the document's issuer is the one asked for. Entra's multi-tenant
        # documents (common, organizations) name a {tenantid} template instead, and a tenant's v2.0 and v1.0
        # issuers are one provider.
        same = issuer.rstrip("/") == configured.rstrip("/")
        if not same and policy.entra:
            same = TENANT_PLACEHOLDER in issuer or policy.tenant_of(configured + "/") == policy.tenant
        if not same:
            raise ValueError(
                f"{self.discovery_url} is the document of issuer {_shown(issuer)!r}, not of OIDC_ISSUER"
            )
        if policy.entra and policy.tenant is None and not policy.allowed_tenants:
            logger.error(
                "OIDC: %s accepts any Entra ID tenant but OIDC_ALLOWED_TENANTS is empty: every token is "
                "refused; list the tenant ids to accept (or * for any)",
                self.discovery_url,
            )
        return policy

    async def _load_keys(self) -> dict[str, Any]:
        document = await self.metadata()
        return await self.http.get_json(str(document["jwks_uri"]))

    async def warm_up(self) -> None:
        """Fetch the discovery document and keys before the first token needs them (failures logged)."""
        try:
            await self.metadata()
            await self.keys.candidates(None)
        except ProviderUnavailable:
            pass

    # validation

    async def verify_access_token(self, token: str) -> Identity:
        return await self.verify(token, audience=self.settings.audience, kind="access token")

    async def verify_id_token(self, token: str, *, nonce: str) -> Identity:
        assert self.settings.client_id is not None
        return await self.verify(token, audience=(self.settings.client_id,), nonce=nonce, kind="ID token")

    async def verify(
        self, token: str, *, audience: Iterable[str], nonce: str | None = None, kind: str = "access token"
    ) -> Identity:
        audience = tuple(audience)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected(
                f"The bearer token is not a well-formed JWT {kind} (its header, claims or signature cannot "
                "be decoded)."
            ) from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected(
                f"The {kind} is signed with algorithm {_shown(alg)!r}, which this server does not accept "
                f"(accepted: {', '.join(sorted(self.algorithms))})."
            )
        if header.get("crit"):
            raise TokenRejected(f"The {kind} has critical header extensions this server does not understand.")
        await self.metadata()
        policy = self.policy
        assert policy is not None
        iss = unverified.get("iss")
        verdict = policy.classify(iss)
        if verdict is None:
            shown = "no issuer" if iss is None else f"issuer {_shown(iss)!r}"
            raise TokenRejected(f"The {kind} has {shown}, which this server does not trust (OIDC_ISSUER).")
        tenant_ok, tenant = verdict
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected(f"The {kind}'s key id (kid) is not a string.")
        candidates = await self.keys.candidates(kid)
        if not candidates:
            raise TokenRejected(
                f"The {kind} is signed with key {_shown(kid)!r}, which the identity provider does not publish "
                "(an old or foreign key)."
            )
        keys = [
            key
            for jwk in candidates
            if (not jwk.get("alg") or jwk.get("alg") == alg)
            and _kty_fits(jwk, alg)
            and (key := self.keys.key_for(jwk, alg)) is not None
        ]
        if not keys:
            raise TokenRejected(
                f"The {kind} claims algorithm {alg}, which does not fit the provider's key {_shown(kid)!r}."
            )
        claims = self._decode(token, keys, alg, audience, unverified, kind)
        if not tenant_ok:
            raise TokenForbidden(
                f"The {kind} was issued by the Entra ID tenant {tenant}, which may not use this server "
                "(OIDC_ALLOWED_TENANTS).",
                code="tenant_not_allowed",
            )
        tid = claims.get("tid")
        if tenant is not None and isinstance(tid, str) and tid.lower() != tenant:
            raise TokenRejected(f"The {kind}'s tenant (tid) is not the tenant of its issuer.")
        if nonce is not None and claims.get("nonce") != nonce:
            raise TokenRejected(f"The {kind} does not carry the nonce of this sign-in.")
        audiences = _strings(claims.get("aud"))
        if nonce is not None and len(audiences) > 1 and claims.get("azp") not in audience:
            raise TokenRejected(f"The {kind} was issued to another client (azp).")
        identity = identity_of(claims, tenant, kind)
        # v1.0 and v2.0 tokens of one Entra tenant name their issuer differently: one user either way
        return dataclasses.replace(identity, issuer=policy.canonical(tenant))

    def _decode(
        self,
        token: str,
        keys: list[Any],
        alg: str,
        audience: tuple[str, ...],
        unverified: Mapping[str, Any],
        kind: str,
    ) -> dict[str, Any]:
        options: Any = {"require": ["exp", "iss"], "verify_iss": False}
        last: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=list(audience),
                    leeway=self.settings.leeway_s,
                    options=options,
                )
                return claims
            except jwt.InvalidSignatureError as exc:
                last = exc  # with no kid several keys may fit: try the next
            except jwt.PyJWTError as exc:
                last = exc
                break
        raise self._rejection(last, unverified, kind)

    @staticmethod
    def _rejection(exc: jwt.PyJWTError | None, claims: Mapping[str, Any], kind: str) -> TokenRejected:
        if isinstance(exc, jwt.ExpiredSignatureError):
            return TokenRejected(
                f"The {kind} expired at {_timestamp(claims.get('exp'))}; get a new one from the identity "
                "provider."
            )
        if isinstance(exc, jwt.ImmatureSignatureError):
            which = "nbf" if "nbf" in str(exc) else "iat"
            return TokenRejected(
                f"The {kind} is not valid yet ({which} {_timestamp(claims.get(which))}); check the clocks."
            )
        if isinstance(exc, jwt.InvalidAudienceError):
            aud = claims.get("aud")
            shown = ", ".join(_shown(a) for a in _strings(aud)) or "none"
            return TokenRejected(
                f"The {kind} is for audience {shown}, not for this server (OIDC_AUDIENCE); request a token for "
                "this server's application."
            )
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return TokenRejected(f"The {kind} lacks the required claim `{exc.claim}`.")
        if isinstance(exc, jwt.InvalidSignatureError):
            if set(_strings(claims.get("aud"))) & GRAPH_AUDIENCES:
                return TokenRejected(
                    f"The {kind} is for Microsoft Graph, whose tokens only Graph can check; request a token "
                    "for this server's application (its api://…/.default scope)."
                )
            return TokenRejected(f"The {kind}'s signature does not verify with the identity provider's key.")
        if isinstance(exc, jwt.InvalidIssuedAtError):
            return TokenRejected(f"The {kind}'s issue time (iat) is not a number.")
        return TokenRejected(f"The {kind} is not valid: its claims could not be checked.")

    async def aclose(self) -> None:
        task = self._metadata_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.keys.aclose()
        await self.http.aclose()


# -- the console's sign-in: authorization code with PKCE --------------------------------------------------


class SignInFailed(Exception):
    """The provider's half of a console sign-in went wrong; `message` is for the person signing in."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class SignInStart:
    """Where to send the browser, and what the callback must find again (kept in the browser's cookie)."""

    url: str
    state: str
    nonce: str
    verifier: str


def code_challenge(verifier: str) -> str:
    """PKCE's S256 challenge of a verifier (RFC 7636)."""
    import base64
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _endpoint(document: Mapping[str, Any], name: str) -> str:
    url = document.get(name)
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise SignInFailed(f"The identity provider's discovery document names no {name}.", 503)
    return url


async def start_sign_in(provider: OidcProvider, redirect_uri: str) -> SignInStart:
    """The authorization request: state and nonce against replay and forgery, an S256 code challenge."""
    import secrets
    from urllib.parse import urlencode

    settings = provider.settings
    assert settings.client_id is not None
    document = await provider.metadata()
    endpoint = _endpoint(document, "authorization_endpoint")
    state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
            "response_mode": "query",
        }
    )
    return SignInStart(f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", state, nonce, verifier)


async def finish_sign_in(
    provider: OidcProvider, code: str, *, redirect_uri: str, verifier: str, nonce: str
) -> Identity:
    """Exchange the code at the token endpoint (with the PKCE verifier) and check the ID token it returns."""
    settings = provider.settings
    assert settings.client_id is not None
    document = await provider.metadata()
    endpoint = _endpoint(document, "token_endpoint")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": settings.client_id,
        "code_verifier": verifier,
    }
    auth: tuple[str, str] | None = None
    if settings.client_secret:
        methods = document.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_post" in methods:
            form["client_secret"] = settings.client_secret
        else:  # RFC 6749 2.3.1: both form-encoded before they go into the Basic header
            from urllib.parse import quote

            auth = (quote(settings.client_id, safe=""), quote(settings.client_secret, safe=""))
    try:
        status, answer = await provider.http.post_form(endpoint, form, auth=auth)
    except FetchFailed as exc:
        _throttle.log("token", logging.WARNING, "OIDC code exchange failed: %s", exc)
        raise SignInFailed("The identity provider could not be reached to finish the sign-in.", 503) from None
    if status != 200:
        error = _shown(answer.get("error") or f"HTTP {status}", 80)
        description = _shown(answer.get("error_description") or "", 300)
        logger.warning("OIDC code exchange refused: %s %s", error, description)
        raise SignInFailed(
            f"The identity provider did not accept the sign-in ({error}). {description}".strip()
        )
    id_token = answer.get("id_token")
    if not isinstance(id_token, str):
        raise SignInFailed("The identity provider's answer has no ID token (is `openid` in OIDC_SCOPES?).")
    try:
        return await provider.verify_id_token(id_token, nonce=nonce)
    except (TokenRejected, TokenForbidden) as exc:
        raise SignInFailed(exc.message, exc.status_code) from None


def admin_refusal(identity: Identity, settings: OidcSettings) -> str | None:
    """Why this identity may not use the console (None: it is an admin by OIDC_ADMIN_GROUPS/ROLES)."""
    groups, roles = set(settings.admin_groups), set(settings.admin_roles)
    if groups & set(identity.groups) or roles & set(identity.roles):
        return None
    who = identity.email or identity.name or identity.subject
    if not groups and not roles:
        return (
            f"You are signed in as {who}, but this server names no administrators of its identity provider "
            "(OIDC_ADMIN_GROUPS, OIDC_ADMIN_ROLES), so nobody can open the console this way."
        )
    if identity.groups_overage and groups:
        return (
            f"You are signed in as {who}, but your sign-in does not list your groups (you are in too many; "
            "Entra ID left them out), so membership in an admin group cannot be seen. Ask for an admin app "
            "role (OIDC_ADMIN_ROLES), or have the app registration emit only the groups assigned to it."
        )
    return (
        f"You are signed in as {who}, but you are not an administrator of this server: the console needs "
        "membership in one of its admin groups or one of its admin roles."
    )


# -- the serving path ----------------------------------------------------------------------------------


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments (a JWS in compact form), the first a JSON object ('eyJ' is '{"')."""
    if not token.startswith("eyJ"):
        return False
    parts = token.split(".")
    return len(parts) == 3 and all(_B64URL.fullmatch(p) for p in parts[:2])


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class OidcAuthenticator:
    """Signs a caller in with an access token of the provider: the token checked, the caller a user.

    With a database the identity becomes a user (llm_backend.services.org: created at first sight, email
    and name kept current, teams from its groups), whose and whose team's limits, budgets and models then
    apply as a key's would.

    Group overage (Entra ID leaves the groups out of a token of a user in too many: `_claim_names` or
    `hasgroups`) is refused only where groups matter, i.e. some team is mapped to groups: this server
    cannot ask Microsoft Graph for them (it may have no way out to the internet, and no Graph permission),
    and taking "no groups" would quietly drop the user from every group-mapped team, or keep stale
    memberships. Where no team is mapped to groups they are not needed and the token is as good as any.
    """

    GROUPS_MAPPED_TTL = 30.0  # seconds the answer to "is any team mapped to groups" is kept

    def __init__(
        self,
        provider: OidcProvider,
        *,
        members: Any = None,
        org: Any = None,
        guard: Any = None,
    ) -> None:
        self.provider = provider
        self.members = members  # llm_backend.services.org.Members
        self.org = org  # llm_backend.services.org.OrgStore
        self.guard = guard  # llm_backend.services.dbguard.DatabaseGuard
        self._groups_mapped: tuple[float, bool] | None = None

    async def groups_mapped(self) -> bool:
        """Whether any team is mapped to OIDC groups (asked only for overage tokens; cached briefly)."""
        if self.org is None:
            return False
        now = monotonic()
        cached = self._groups_mapped
        if cached is not None and now - cached[0] < self.GROUPS_MAPPED_TTL:
            return cached[1]
        teams = await self._db("team look-up", self.org.list_teams)
        mapped = any(t.get("groups") for t in teams)
        self._groups_mapped = (now, mapped)
        return mapped

    async def _db(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        from llm_backend.db.session import DatabaseUnavailable
        from llm_backend.services.access import database_unavailable
        from llm_backend.services.dbguard import DatabaseGuard

        guard = self.guard or DatabaseGuard(5.0)
        try:
            return await guard.run(what, fn, *args)
        except DatabaseUnavailable:
            raise database_unavailable(guard, "user") from None

    async def __call__(self, token: str, caller: Any, headers: Any = None) -> dict[str, Any]:
        try:
            identity = await self.provider.verify_access_token(token)
        except TokenForbidden:
            # refused before it is anyone here, like a wrong key: no request-log row for it either
            caller.recorded = True
            raise
        if identity.groups_overage and await self.groups_mapped():
            caller.recorded = True
            raise TokenForbidden(
                "The access token does not list its user's groups: Entra ID leaves them out when a user is "
                "in too many (group overage), and this server maps groups to teams, so it cannot tell which "
                "teams the user belongs to. Configure the app registration to emit only the groups assigned "
                "to the application (groupMembershipClaims: ApplicationGroup), or use app roles.",
                code="groups_overage",
            )
        caller.identity = identity
        caller.log["user"] = identity.email or identity.subject
        from llm_backend.services.access import chosen_team, team_not_allowed

        chosen = chosen_team(headers)
        if self.members is not None:
            await self._become_member(identity, caller, chosen)
        elif chosen is not None:  # no database, no teams
            raise team_not_allowed()
        return {"sub": identity.subject, "oidc": True}

    async def _become_member(self, identity: Identity, caller: Any, chosen: str | None = None) -> None:
        from llm_backend.db.session import DatabaseUnavailable
        from llm_backend.services.access import apply_member, database_unavailable

        try:
            member = await self.members.resolve_user(
                subject=identity.subject,
                issuer=identity.issuer,
                email=identity.email,
                name=identity.name,
                # overage: the groups are unknown, so memberships stay as they are (no team maps groups)
                groups=None if identity.groups_overage else list(identity.groups),
            )
        except DatabaseUnavailable:
            raise database_unavailable(self.members.guard, "user") from None
        if not member.enabled:
            caller.recorded = True
            raise PermissionDenied(
                f"The user {identity.email or identity.subject} is disabled on this server.",
                code="user_disabled",
            )
        apply_member(caller, member, chosen=chosen)


async def setup_oidc(settings: Any, resources: Any, stack: contextlib.AsyncExitStack) -> None:
    """The worker's provider and authenticator (when OIDC_ISSUER is set); the keys fetched in the background."""
    oidc: OidcSettings = settings.oidc
    if not oidc.enabled:
        return
    provider = OidcProvider(oidc)
    stack.push_async_callback(provider.aclose)
    resources.oidc_provider = provider
    resources.oidc = OidcAuthenticator(
        provider,
        members=getattr(resources, "members", None),
        org=getattr(resources, "org", None),
        guard=getattr(resources.members, "guard", None) if getattr(resources, "members", None) else None,
    )
    warm = asyncio.get_running_loop().create_task(provider.warm_up())
    stack.push_async_callback(_cancel, warm)
    resources.metrics.sampled_counter(
        "llm_backend_oidc_jwks_fetches",
        "Fetches of the OIDC provider's signing keys (first loads, refreshes, unknown key ids).",
        lambda: provider.keys.fetches,
    )
    logger.info(
        "OIDC sign-in on: tokens of %s for audience %s", oidc.issuer, ", ".join(oidc.audience) or "(none)"
    )


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
