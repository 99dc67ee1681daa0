"""API keys we issue: generation, hashing, validation of their settings, and their management."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from llm_backend.db.repositories import (
    ApiKeyRepository,
    TeamRepository,
    UserRepository,
    hash_api_key,
    key_token_totals,
    level_totals,
    period_totals,
)
from llm_backend.db.session import session_scope
from llm_backend.durations import parse_duration
from llm_backend.errors import InvalidRequest, NotFound
from llm_backend.limits import KeyLimits
from llm_backend.services.periods import (
    PERIOD_FIELDS,
    clean_period,
    complete_period,
    period_limits,
    period_public,
)

KEY_PREFIX = "sk-llmb-"
DISPLAY_CHARS = 12  # "sk-llmb-" + 4 characters of the secret


def generate_key() -> str:
    """A new secret: the prefix and 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def display_prefix(secret: str) -> str:
    return secret[:DISPLAY_CHARS]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the serving path needs of a key, detached from the database session."""

    id: str
    name: str
    owner: str | None
    key_prefix: str
    allowed_models: frozenset[str] | None
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    limits: KeyLimits
    expires_at: datetime | None
    enabled: bool
    team_id: str | None = None  # the team the key belongs to: its limits apply too
    user_id: str | None = None  # the user the key belongs to: its requests count for that user
    trusted_ui: bool = False  # may name its end user per request (TRUSTED_USER_HEADERS)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))

    def ip_allowed(self, ip: str | None) -> bool:
        if self.allowed_networks is None:
            return True
        if ip is None:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.allowed_networks)


def _aware(when: datetime | None) -> datetime | None:
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when


def key_info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        owner=row.owner,
        key_prefix=row.key_prefix,
        allowed_models=frozenset(row.allowed_models) if row.allowed_models is not None else None,
        allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in row.allowed_ips)
        if row.allowed_ips is not None
        else None,
        limits=KeyLimits(
            rpm=row.rpm,
            tpm=row.tpm,
            max_parallel=row.max_parallel,
            daily_tokens=row.daily_tokens,
            monthly_tokens=row.monthly_tokens,
            **period_limits(row),
        ),
        expires_at=_aware(row.expires_at),
        enabled=bool(row.enabled),
        team_id=row.team_id,
        user_id=row.user_id,
        trusted_ui=bool(row.trusted_ui),
    )


def key_public(row: Any) -> dict[str, Any]:
    """A key as the admin API and CLI show it: never the secret or its hash."""

    def iso(when: datetime | None) -> str | None:
        when = _aware(when)
        return when.isoformat() if when is not None else None

    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "owner": row.owner,
        "prefix": row.key_prefix,
        "models": row.allowed_models,
        "rpm": row.rpm,
        "tpm": row.tpm,
        "max_parallel": row.max_parallel,
        "daily_tokens": row.daily_tokens,
        "monthly_tokens": row.monthly_tokens,
        **period_public(row),
        "allowed_ips": row.allowed_ips,
        "expires_at": iso(row.expires_at),
        "enabled": bool(row.enabled),
        "team": row.team_id,
        "user": row.user_id,
        "trusted_ui": bool(row.trusted_ui),
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
    }


_LIMIT_FIELDS = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")
_EDITABLE = {
    "name",
    "owner",
    "models",
    "allowed_ips",
    "enabled",
    "expires_at",
    "expires_in",
    "team",
    "user",
    "trusted_ui",
    *_LIMIT_FIELDS,
    *PERIOD_FIELDS,
}


def clean_fields(data: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    """Validate admin input into repository fields; raise InvalidRequest naming the bad field."""
    unknown = set(data) - _EDITABLE
    if unknown:
        field_name = sorted(unknown)[0]
        raise InvalidRequest(f"Unknown field '{field_name}'.", param=field_name, code="unknown_parameter")
    out: dict[str, Any] = {}
    if creating or "name" in data:
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("'name' must be a non-empty string.", param="name")
        out["name"] = name.strip()[:255]
    if "owner" in data:
        owner: str | None = data["owner"]
        if owner is not None and not isinstance(owner, str):
            raise InvalidRequest("'owner' must be a string.", param="owner")
        out["owner"] = owner
    if "models" in data:
        models = data["models"]
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) for m in models)
        ):
            raise InvalidRequest(
                "'models' must be a list of model names, or null for every model.", param="models"
            )
        out["allowed_models"] = sorted(set(models)) if models is not None and "*" not in models else None
    for field in _LIMIT_FIELDS:
        if field in data:
            value = data[field]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidRequest(
                    f"'{field}' must be a whole number >= 0, or null for no limit.", param=field
                )
            out[field] = value
    clean_period(data, out)
    if "allowed_ips" in data:
        ips = data["allowed_ips"]
        if ips is not None:
            if not isinstance(ips, list):
                raise InvalidRequest("'allowed_ips' must be a list of CIDR ranges.", param="allowed_ips")
            try:
                ips = [str(ipaddress.ip_network(str(n), strict=False)) for n in ips]
            except ValueError as exc:
                raise InvalidRequest(f"'allowed_ips': {exc}.", param="allowed_ips") from None
        out["allowed_ips"] = ips
    if "enabled" in data:
        if not isinstance(data["enabled"], bool):
            raise InvalidRequest("'enabled' must be true or false.", param="enabled")
        out["enabled"] = data["enabled"]
    if "trusted_ui" in data:
        if not isinstance(data["trusted_ui"], bool):
            raise InvalidRequest("'trusted_ui' must be true or false.", param="trusted_ui")
        out["trusted_ui"] = data["trusted_ui"]
    for ref in ("team", "user"):  # an id or a name (an email for a user), resolved by the store
        if ref in data:
            value = data[ref]
            if value is not None and (
                not isinstance(value, str) or not value.strip() or len(value) > 320 or "\x00" in value
            ):
                raise InvalidRequest(f"'{ref}' must be the id or the name of a {ref}, or null.", param=ref)
            out[f"{ref}_ref"] = value.strip() if value is not None else None
    if data.get("expires_in") is not None:
        try:
            out["expires_at"] = datetime.now(UTC) + parse_duration(str(data["expires_in"]))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="expires_in") from None
    elif "expires_at" in data:
        raw = data["expires_at"]
        if raw is None:
            out["expires_at"] = None
        else:
            try:
                when = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
            except ValueError:
                raise InvalidRequest("'expires_at' must be an ISO 8601 time.", param="expires_at") from None
            out["expires_at"] = _aware(when)
    return out


class KeyStore:
    """Key management over the database (blocking calls: run them in a thread from async code).

    `listeners` are called as listener(key_id, KeyInfo or None when deleted) after a change committed, in
    the calling thread: the serving path's key cache drops its copy of a changed key there and then."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.listeners: list[Callable[[str, KeyInfo | None], None]] = []

    def _changed(self, key_id: str, info: KeyInfo | None) -> None:
        for listener in self.listeners:
            listener(key_id, info)

    @staticmethod
    def _resolve_refs(session: Any, fields: dict[str, Any]) -> None:
        """Turn the team/user a key is given (ids or names) into ids; NotFound for one that is not there."""
        if "team_ref" in fields:
            ref = fields.pop("team_ref")
            team = None
            if ref is not None:
                repo = TeamRepository(session)
                team = repo.get(ref) or repo.get_by_name(ref)
                if team is None:
                    raise NotFound(f"No team with id or name '{ref}'.", param="team", code="team_not_found")
            fields["team_id"] = team.id if team is not None else None
        if "user_ref" in fields:
            ref = fields.pop("user_ref")
            user = None
            if ref is not None:
                users = UserRepository(session)
                user = users.get(ref)
                if user is None:
                    found = [u for u in users.list(q=ref, limit=2) if ref in (u.email, u.subject)]
                    user = found[0] if len(found) == 1 else None
                if user is None:
                    raise NotFound(f"No user with id or email '{ref}'.", param="user", code="user_not_found")
            fields["user_id"] = user.id if user is not None else None

    def create(self, data: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        fields = clean_fields(data, creating=True)
        secret = generate_key()
        complete_period(None, fields)
        with session_scope(self.engine, write=True) as session:
            self._resolve_refs(session, fields)
            row = ApiKeyRepository(session).create(
                key_hash=hash_api_key(secret), key_prefix=display_prefix(secret), **fields
            )
            return key_public(row), secret

    def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        with session_scope(self.engine) as session:
            return [key_public(r) for r in ApiKeyRepository(session).list(owner=owner)]

    def get(self, key_id: str) -> dict[str, Any]:
        with session_scope(self.engine) as session:
            row = ApiKeyRepository(session).get(key_id)
            if row is None:
                raise NotFound(f"No API key with id '{key_id}'.", param="key_id")
            return key_public(row)

    def update(self, key_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        fields = clean_fields(data, creating=False)
        with session_scope(self.engine, write=True) as session:
            self._resolve_refs(session, fields)
            repo = ApiKeyRepository(session)
            current = repo.get(key_id)
            if current is not None:
                complete_period(current, fields)
            row = repo.update(key_id, **fields) if current is not None else None
            if row is None:
                raise NotFound(f"No API key with id '{key_id}'.", param="key_id")
            public, info = key_public(row), key_info(row)
        self._changed(key_id, info)
        return public

    def delete(self, key_id: str) -> None:
        with session_scope(self.engine, write=True) as session:
            if not ApiKeyRepository(session).delete(key_id):
                raise NotFound(f"No API key with id '{key_id}'.", param="key_id")
        self._changed(key_id, None)

    def find(self, secret: str) -> KeyInfo | None:
        return self.find_hash(hash_api_key(secret))

    def find_hash(self, digest: str) -> KeyInfo | None:
        with session_scope(self.engine) as session:
            row = ApiKeyRepository(session).get_by_hash(digest)
            return key_info(row) if row is not None else None

    def touch(self, key_id: str) -> None:
        with session_scope(self.engine, write=True) as session:
            ApiKeyRepository(session).touch(key_id)

    def level_totals(
        self, level: str, level_id: str, day_start: datetime, month_start: datetime
    ) -> tuple[int, int, float, float]:
        """Tokens and cost of a key, a user or a team since the start of the UTC day and month."""
        with session_scope(self.engine) as session:
            return level_totals(session, level, level_id, day_start, month_start)

    def period_totals(
        self, level: str, level_id: str, start: datetime | None, end: datetime
    ) -> tuple[int, float]:
        """Tokens and cost of a key, a user or a team within a budget period [start, end)."""
        with session_scope(self.engine) as session:
            return period_totals(session, level, level_id, start, end)

    def token_totals(self, key_id: str, day_start: datetime, month_start: datetime) -> tuple[int, int]:
        """Tokens the key used since the start of the UTC day and of the UTC month, from the request log."""
        with session_scope(self.engine) as session:
            return key_token_totals(session, key_id, day_start, month_start)


def expiry_from(text: str | None) -> timedelta | None:
    return parse_duration(text) if text else None
