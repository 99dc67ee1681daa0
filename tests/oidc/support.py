"""A real OIDC issuer for the tests: our own RSA and EC keys, discovery and JWKS served by pytest-httpserver."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from llm_backend.config import OidcSettings
from llm_backend.db.session import make_engine

TENANT = "11111111-2222-3333-4444-555555555555"
OTHER_TENANT = "99999999-8888-7777-6666-555555555555"
AUDIENCE = "api://llm-backend"
APP_ID = "6a3c8e1f-0d2b-4c5a-9e7f-1b2c3d4e5f60"  # the app registration's client id (an Entra v1 `aud`)
CLIENT_ID = "console-client"
CLIENT_SECRET = "console-client-secret"

_KEYS: dict[str, Any] = {}
_KEYS_LOCK = threading.Lock()  # the issuer's thread and the test's may ask for a new key at once


def _private_key(name: str) -> Any:
    """Keys made once per test run (RSA generation is the slow part)."""
    with _KEYS_LOCK:
        return _make_key(name)


def _make_key(name: str) -> Any:
    if name not in _KEYS:
        if name.startswith("rsa"):
            _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif name.startswith("ec384"):
            _KEYS[name] = ec.generate_private_key(ec.SECP384R1())
        else:
            _KEYS[name] = ec.generate_private_key(ec.SECP256R1())
    return _KEYS[name]


def public_jwk(kid: str) -> dict[str, Any]:
    key = _private_key(kid).public_key()
    if kid.startswith("rsa"):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig"}


def public_pem(kid: str) -> bytes:
    return (
        _private_key(kid)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """An Entra-shaped issuer (`{base}/{tenant}/v2.0`) on the test's HTTP server.

    `published` lists the key ids the JWKS offers (change it to rotate keys); `jwks_fetches` counts the
    JWKS requests; `jwks_down` makes the key endpoint answer 503. With `multi_tenant`, OIDC_ISSUER is
    `{base}/common/v2.0`, whose document names the `{tenantid}` template, as Entra's does.
    """

    def __init__(self, server: HTTPServer, *, multi_tenant: bool = False) -> None:
        self.server = server
        self.base = server.url_for("/").rstrip("/")
        self.tenant = TENANT
        self.issuer = f"{self.base}/{TENANT}/v2.0"
        self.v1_issuer = f"{self.base}/{TENANT}/"
        self.configured_issuer = f"{self.base}/common/v2.0" if multi_tenant else self.issuer
        self.published: list[str] = ["rsa1", "ec1"]
        self.jwks_fetches = 0
        self.jwks_down = False
        self._lock = threading.Lock()
        self.codes: dict[str, dict[str, Any]] = {}  # authorization codes handed out
        self.token_requests: list[dict[str, Any]] = []
        self.next_login: dict[str, Any] = {}  # claims the next sign-in's ID token carries
        self.public_client = False  # the client authenticates with PKCE alone (no secret may be sent)
        discovered = f"{self.base}/{{tenantid}}/v2.0" if multi_tenant else self.issuer
        path = self.configured_issuer.removeprefix(self.base)
        self.document = {
            "issuer": discovered,
            "jwks_uri": f"{self.base}/{TENANT}/discovery/v2.0/keys",
            "authorization_endpoint": f"{self.base}/{TENANT}/oauth2/v2.0/authorize",
            "token_endpoint": f"{self.base}/{TENANT}/oauth2/v2.0/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        }
        server.expect_request(f"{path}/.well-known/openid-configuration").respond_with_json(self.document)
        server.expect_request(f"/{TENANT}/discovery/v2.0/keys").respond_with_handler(self._jwks)
        server.expect_request(f"/{TENANT}/oauth2/v2.0/authorize").respond_with_handler(self._authorize)
        server.expect_request(f"/{TENANT}/oauth2/v2.0/token", method="POST").respond_with_handler(self._token)

    # -- settings ---------------------------------------------------------------------------------------

    def settings(self, **kw: Any) -> OidcSettings:
        kw.setdefault("issuer", self.configured_issuer)
        kw.setdefault("audience", (AUDIENCE, APP_ID))
        kw.setdefault("allowed_tenants", ())
        kw.setdefault("http_timeout_s", 10.0)
        return OidcSettings(**kw)

    # -- tokens -----------------------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "sub-ada",
            "oid": "0a0a0a0a-0000-4000-8000-00000000ada0",
            "tid": self.tenant,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + 600,
            "name": "Ada Lovelace",
            "preferred_username": "ada@example.org",
            "groups": ["g-engineering"],
            "roles": ["LLM.User"],
            "scp": "access",
            "ver": "2.0",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, kid: str = "rsa1", alg: str | None = None, headers: Any = None, **claims: Any) -> str:
        alg = alg or ("RS256" if kid.startswith("rsa") else "ES384" if kid.startswith("ec384") else "ES256")
        return jwt.encode(
            self.claims(**claims), _private_key(kid), algorithm=alg, headers={"kid": kid, **(headers or {})}
        )

    def v1_token(self, **claims: Any) -> str:
        """An Entra v1.0 access token: sts-style issuer, the app id URI or the app id as audience."""
        claims.setdefault("iss", self.v1_issuer)
        claims.setdefault("aud", APP_ID)
        claims.setdefault("ver", "1.0")
        claims.setdefault("upn", "grace@example.org")
        claims.setdefault("preferred_username", None)
        return self.token(**claims)

    def unsigned_token(self) -> str:
        """`alg: none`, no signature."""
        header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa1"}).encode())
        return f"{header}.{b64url(json.dumps(self.claims()).encode())}."

    def hs256_with_public_key(self, kid: str = "rsa1") -> str:
        """The classic confusion: HS256 with the provider's published public key as the shared secret."""
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = b64url(json.dumps(self.claims()).encode())
        signature = hmac.new(public_pem(kid), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64url(signature)}"

    # -- endpoints --------------------------------------------------------------------------------------

    def _jwks(self, request: Request) -> Response:
        with self._lock:
            self.jwks_fetches += 1
            if self.jwks_down:
                return Response("unavailable", status=503)
            keys = [public_jwk(kid) for kid in self.published]
        return Response(json.dumps({"keys": keys}), content_type="application/json")

    def _authorize(self, request: Request) -> Response:
        """Signs the browser in at once (no login form) and redirects back with a code."""
        args = request.args
        assert args.get("response_type") == "code", args
        assert args.get("code_challenge_method") == "S256", args
        code = uuid.uuid4().hex
        self.codes[code] = {
            "client_id": args.get("client_id"),
            "redirect_uri": args.get("redirect_uri"),
            "code_challenge": args.get("code_challenge"),
            "nonce": args.get("nonce"),
            "scope": args.get("scope"),
            "claims": dict(self.next_login),
        }
        target = f"{args['redirect_uri']}?{urlencode({'code': code, 'state': args.get('state', '')})}"
        return Response(status=302, headers={"Location": target})

    def _token(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        self.token_requests.append(form)

        def error(code: str, description: str) -> Response:
            body = json.dumps({"error": code, "error_description": description})
            return Response(body, status=400, content_type="application/json")

        grant = self.codes.pop(form.get("code", ""), None)
        if form.get("grant_type") != "authorization_code" or grant is None:
            return error("invalid_grant", "unknown or used code")
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        auth = request.authorization
        if auth is not None:
            client_id, secret = auth.username, auth.password
        if client_id != CLIENT_ID or secret != (None if self.public_client else CLIENT_SECRET):
            return error("invalid_client", "bad client credentials")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return error("invalid_grant", "redirect_uri differs from the authorization request")
        verifier = form.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode()).digest()) != grant["code_challenge"]:
            return error("invalid_grant", "PKCE verification failed")
        id_token = self.token(aud=CLIENT_ID, nonce=grant["nonce"], **grant["claims"])
        body = {"token_type": "Bearer", "id_token": id_token, "access_token": self.token(), "expires_in": 600}
        return Response(json.dumps(body), content_type="application/json")


def assert_openai_error(response: Any, status: int, *, code: Any = ..., words: Iterable[str] = ()) -> str:
    """The answer is `status` with OpenAI's error shape; returns the message (which must hold `words`)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert "Traceback" not in response.text
    if code is not ...:
        assert error["code"] == code, error
    message: str = error["message"]
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


def request_log(db_url: str) -> list[dict[str, Any]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM request_log"))]
    finally:
        engine.dispose()
