"""Teams and users: their management, and who a signed-in person is (a Member: user, teams, limit levels)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from llm_backend.db.base import utcnow
from llm_backend.db.repositories import ApiKeyRepository, TeamRepository, UserRepository
from llm_backend.db.session import DatabaseUnavailable, session_scope
from llm_backend.errors import GatewayError, InvalidRequest, NotFound
from llm_backend.limits import KeyLimits, Level
from llm_backend.logthrottle import LogThrottle
from llm_backend.services.dbguard import DatabaseGuard
from llm_backend.services.periods import (
    PERIOD_FIELDS,
    clean_amount,
    clean_count,
    clean_period,
    complete_period,
    period_limits,
    period_public,
)

logger = logging.getLogger(__name__)
_throttle = LogThrottle(logger, 60.0)

MEMBER_TTL = 5.0  # seconds a resolved member stays cached in the worker (changes elsewhere apply within it)
SEEN_EVERY = 60.0  # a user's last_seen_at is written at most this often
CACHE_MAX = 10_000  # cached members per worker
ROLES = ("member", "admin")  # a team admin sees the team's conversations and usage
MAX_GROUPS = 1000  # group claims kept per user (Entra ID sends at most 200 before its overage claim)
_TEXT_MAX = 255

#: Issuer of the users a trusted front-end names: one namespace per key, so that a front-end can never
#: speak for an OIDC subject (or for the users of another front-end).
TRUSTED_UI_ISSUER = "urn:llm-backend:trusted-ui:"


class Conflict(GatewayError):
    status_code = 409
    code = "conflict"


# ---------------------------------------------------------------------------------------------------------
# What the serving path gets


@dataclass(frozen=True, slots=True)
class Member:
    """A user as the serving path needs it, detached from the database.

    `levels` are the limit levels the user's requests count against besides their key: the user, then
    the team (`team_id`, the first of `team_ids` by name; a key's own team takes its place for requests
    made with that key, and a request may choose another of the user's teams with X-LLM-Backend-Team).
    `allowed_models` is what both allow (None: every model)."""

    user_id: str
    issuer: str
    subject: str
    email: str | None
    name: str | None
    enabled: bool
    team_ids: tuple[str, ...]
    team_id: str | None
    admin_of: frozenset[str]  # teams the user administers
    allowed_models: frozenset[str] | None
    user_models: frozenset[str] | None  # the user's own allowance (without its team's)
    user_level: Level
    team_levels: Mapping[str, Level]  # team id -> its level, for every team of the user
    team_models: Mapping[str, frozenset[str] | None] = dataclasses.field(default_factory=dict)

    def find_team(self, ref: str) -> str | None:
        """The id of the user's team with this id or name (None: not one of the user's teams)."""
        if ref in self.team_levels:
            return ref
        return next((tid for tid, level in self.team_levels.items() if level.name == ref), None)

    @property
    def levels(self) -> tuple[Level, ...]:
        """The user's level and its team's, in that order."""
        team = self.team_levels.get(self.team_id) if self.team_id else None
        return (self.user_level,) if team is None else (self.user_level, team)

    @property
    def limits(self) -> KeyLimits:
        """The tightest of the user's and the team's limits, field by field (for display)."""
        return merge_limits(level.limits for level in self.levels)


def merge_limits(limits: Iterable[KeyLimits]) -> KeyLimits:
    """The smallest value of each field over several limits (None: unlimited)."""
    out: dict[str, Any] = {}
    every = list(limits)
    for lim in every:
        for name in KeyLimits.__dataclass_fields__:
            value = getattr(lim, name)
            if name in ("period_start", "period_end"):
                continue
            if value is not None and (out.get(name) is None or value < out[name]):
                out[name] = value
    # a period's bounds are not merged: those of the first level with a period budget
    period = next((lim for lim in every if lim.has_period()), None)
    if period is not None:
        out["period_start"], out["period_end"] = period.period_start, period.period_end
    return KeyLimits(**out)


def intersect_models(*allowed: frozenset[str] | None) -> frozenset[str] | None:
    """Models every one of `allowed` permits (None in `allowed`: every model)."""
    out: frozenset[str] | None = None
    for models in allowed:
        if models is not None:
            out = models if out is None else out & models
    return out


def _limits_of(row: Any) -> KeyLimits:
    return KeyLimits(
        rpm=row.rpm,
        tpm=row.tpm,
        max_parallel=row.max_parallel,
        daily_tokens=row.daily_tokens,
        monthly_tokens=row.monthly_tokens,
        daily_spend=row.daily_spend,
        monthly_spend=row.monthly_spend,
        **period_limits(row),
    )


def _models_of(row: Any) -> frozenset[str] | None:
    return frozenset(row.allowed_models) if row.allowed_models is not None else None


def team_level(team: Any) -> Level:
    return Level("team", team.id, _limits_of(team), name=team.name)


def user_level(user: Any) -> Level:
    return Level("user", user.id, _limits_of(user), name=user.email or user.name or user.subject)


def _member(user: Any, memberships: Sequence[tuple[Any, Any]]) -> Member:
    teams = [team for _, team in memberships]
    team_levels = {team.id: team_level(team) for team in teams}
    primary = teams[0] if teams else None
    return Member(
        user_id=user.id,
        issuer=user.issuer,
        subject=user.subject,
        email=user.email,
        name=user.name,
        enabled=bool(user.enabled),
        team_ids=tuple(t.id for t in teams),
        team_id=primary.id if primary is not None else None,
        admin_of=frozenset(m.team_id for m, _ in memberships if m.role == "admin"),
        allowed_models=intersect_models(
            _models_of(user), _models_of(primary) if primary is not None else None
        ),
        user_models=_models_of(user),
        user_level=user_level(user),
        team_levels=team_levels,
        team_models={team.id: _models_of(team) for team in teams},
    )


# ---------------------------------------------------------------------------------------------------------
# Admin input


_LIMIT_INTS = ("rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens")
_LIMIT_MONEY = ("daily_spend", "monthly_spend")
_TEAM_FIELDS = frozenset({"name", "models", "groups", *_LIMIT_INTS, *_LIMIT_MONEY, *PERIOD_FIELDS})
_USER_FIELDS = frozenset(
    {"email", "name", "enabled", "models", "teams", "admin_of", *_LIMIT_INTS, *_LIMIT_MONEY, *PERIOD_FIELDS}
)


def _text_list(data: Mapping[str, Any], field: str, *, what: str) -> list[str] | None:
    value = data[field]
    if value is None:
        return None
    if isinstance(value, str):  # the CLI's comma-separated form
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (
        not isinstance(value, list)
        or len(value) > MAX_GROUPS
        or not all(
            isinstance(v, str) and v.strip() and len(v) <= _TEXT_MAX and "\x00" not in v for v in value
        )
    ):
        raise InvalidRequest(
            f"'{field}' must be a list of {what} (non-empty strings of at most {_TEXT_MAX} characters, "
            f"at most {MAX_GROUPS}), or null.",
            param=field,
            code="invalid_value",
        )
    return sorted({v.strip() for v in value})


def clean_limits(data: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Validate models, token limits and money budgets of admin input into `out` (repository fields)."""
    if "models" in data:
        models = _text_list(data, "models", what="model names")
        out["allowed_models"] = models if models is not None and "*" not in models else None
    for field in _LIMIT_INTS:
        if field in data:
            out[field] = clean_count(field, data[field])
    for field in _LIMIT_MONEY:
        if field in data:
            out[field] = clean_amount(field, data[field])
    clean_period(data, out)


def _unknown(data: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequest(f"Unknown field '{name}'.", param=name, code="unknown_parameter")


def _name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value.strip()) > _TEXT_MAX:
        raise InvalidRequest(
            f"'{field}' must be a non-empty string of at most {_TEXT_MAX} characters.",
            param=field,
            code="invalid_value",
        )
    return value.strip()


def clean_team_fields(data: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidRequest("The request body must be a JSON object.")
    _unknown(data, _TEAM_FIELDS)
    out: dict[str, Any] = {}
    if creating or "name" in data:
        out["name"] = _name(data.get("name"))
    clean_limits(data, out)
    if "groups" in data:
        out["groups"] = _text_list(data, "groups", what="OIDC group ids or names")
    return out


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return (when.replace(tzinfo=UTC) if when.tzinfo is None else when).isoformat()


def _limits_public(row: Any) -> dict[str, Any]:
    return {
        "models": row.allowed_models,
        "rpm": row.rpm,
        "tpm": row.tpm,
        "max_parallel": row.max_parallel,
        "daily_tokens": row.daily_tokens,
        "monthly_tokens": row.monthly_tokens,
        "daily_spend": row.daily_spend,
        "monthly_spend": row.monthly_spend,
        **period_public(row),
    }


def team_public(team: Any, members: int | None = None) -> dict[str, Any]:
    out = {
        "id": team.id,
        "object": "team",
        "name": team.name,
        **_limits_public(team),
        "groups": team.groups,
        "created_at": _iso(team.created_at),
        "updated_at": _iso(team.updated_at),
    }
    if members is not None:
        out["members"] = members
    return out


def user_public(user: Any, memberships: Sequence[tuple[Any, Any]] = ()) -> dict[str, Any]:
    return {
        "id": user.id,
        "object": "user",
        "issuer": user.issuer,
        "subject": user.subject,
        "email": user.email,
        "name": user.name,
        "enabled": bool(user.enabled),
        **_limits_public(user),
        "groups": user.groups,
        "teams": [
            {
                "id": team.id,
                "name": team.name,
                "role": m.role,
                "source": [s for s, on in (("groups", m.via_groups), ("admin", m.via_admin)) if on],
            }
            for m, team in memberships
        ],
        "created_at": _iso(user.created_at),
        "last_seen_at": _iso(user.last_seen_at),
    }


# ---------------------------------------------------------------------------------------------------------
# The store (blocking: run it in a thread from async code)


class OrgStore:
    """Teams and users over the database.

    `listeners` are called with no arguments after a change committed (a team or a user edited or
    deleted): the serving path's caches drop what they hold there and then."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.listeners: list[Callable[[], None]] = []

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    # -- teams --------------------------------------------------------------------------------------------

    def _team(self, repo: TeamRepository, ref: str) -> Any:
        """A team by id or, failing that, by name; NotFound when neither."""
        team = repo.get(ref) or repo.get_by_name(ref)
        if team is None:
            raise NotFound(f"No team with id or name '{ref}'.", param="team", code="team_not_found")
        return team

    def team_id(self, ref: str) -> str:
        """The id of the team named or numbered `ref` (NotFound when there is none)."""
        with session_scope(self.engine) as session:
            return str(self._team(TeamRepository(session), ref).id)

    def create_team(self, data: Mapping[str, Any]) -> dict[str, Any]:
        fields = clean_team_fields(data, creating=True)
        complete_period(None, fields)
        try:
            with session_scope(self.engine, write=True) as session:
                repo = TeamRepository(session)
                if repo.get_by_name(fields["name"]) is not None:
                    raise Conflict(f"A team named '{fields['name']}' exists already.", param="name")
                return team_public(repo.create(**fields), 0)
        except IntegrityError:  # created by someone else meanwhile
            raise Conflict(f"A team named '{fields['name']}' exists already.", param="name") from None

    def list_teams(self) -> list[dict[str, Any]]:
        with session_scope(self.engine) as session:
            repo = TeamRepository(session)
            return [team_public(t, len(repo.members(t.id))) for t in repo.list()]

    def get_team(self, ref: str) -> dict[str, Any]:
        with session_scope(self.engine) as session:
            repo = TeamRepository(session)
            team = self._team(repo, ref)
            members = repo.members(team.id)
            out = team_public(team, len(members))
            out["users"] = [
                {"id": u.id, "email": u.email, "name": u.name, "role": m.role} for m, u in members
            ]
            out["keys"] = [k.id for k in ApiKeyRepository(session).list(team_id=team.id)]
            return out

    def update_team(self, ref: str, data: Mapping[str, Any]) -> dict[str, Any]:
        fields = clean_team_fields(data, creating=False)
        try:
            with session_scope(self.engine, write=True) as session:
                repo = TeamRepository(session)
                team = self._team(repo, ref)
                if "name" in fields and fields["name"] != team.name and repo.get_by_name(fields["name"]):
                    raise Conflict(f"A team named '{fields['name']}' exists already.", param="name")
                complete_period(team, fields)
                repo.update(team.id, **fields)
                out = team_public(team, len(repo.members(team.id)))
        except IntegrityError:
            raise Conflict(f"A team named '{fields.get('name')}' exists already.", param="name") from None
        self._changed()
        return out

    def delete_team(self, ref: str) -> str:
        """Delete a team and its memberships; refused (409) while keys belong to it."""
        with session_scope(self.engine, write=True) as session:
            repo = TeamRepository(session)
            team = self._team(repo, ref)
            keys = ApiKeyRepository(session).list(team_id=team.id)
            if keys:
                raise Conflict(
                    f"The team '{team.name}' still has {len(keys)} API key(s) ({', '.join(k.id for k in keys[:5])}"
                    f"{'…' if len(keys) > 5 else ''}): move or delete them first.",
                    param="team",
                    code="team_has_keys",
                )
            team_id = str(team.id)
            repo.delete(team_id)
        self._changed()
        return team_id

    # -- users --------------------------------------------------------------------------------------------

    def _user(self, repo: UserRepository, ref: str) -> Any:
        user = repo.get(ref)
        if user is None:
            matches = [u for u in repo.list(q=ref, limit=2) if ref in (u.email, u.subject)]
            if len(matches) == 1:
                user = matches[0]
        if user is None:
            raise NotFound(f"No user with id, email or subject '{ref}'.", param="user", code="user_not_found")
        return user

    def user_id(self, ref: str) -> str:
        with session_scope(self.engine) as session:
            return str(self._user(UserRepository(session), ref).id)

    def list_users(self, team: str | None = None, q: str | None = None) -> list[dict[str, Any]]:
        with session_scope(self.engine) as session:
            repo = UserRepository(session)
            team_id = self._team(TeamRepository(session), team).id if team else None
            return [user_public(u, repo.memberships(u.id)) for u in repo.list(team_id=team_id, q=q)]

    def get_user(self, ref: str) -> dict[str, Any]:
        with session_scope(self.engine) as session:
            repo = UserRepository(session)
            user = self._user(repo, ref)
            return user_public(user, repo.memberships(user.id))

    def update_user(self, ref: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Edit a user's limits, email/name, enabled flag, admin-assigned teams (`teams`: the full list,
        ids or names) and the teams it administers (`admin_of`)."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("The request body must be a JSON object.")
        _unknown(data, _USER_FIELDS)
        fields: dict[str, Any] = {}
        clean_limits(data, fields)
        for text in ("email", "name"):
            if text in data:
                fields[text] = None if data[text] is None else _name(data[text], text)
        if "enabled" in data:
            if not isinstance(data["enabled"], bool):
                raise InvalidRequest(
                    "'enabled' must be true or false.", param="enabled", code="invalid_value"
                )
            fields["enabled"] = data["enabled"]
        teams = _text_list(data, "teams", what="team ids or names") if "teams" in data else None
        admin_of = _text_list(data, "admin_of", what="team ids or names") if "admin_of" in data else None
        with session_scope(self.engine, write=True) as session:
            repo = UserRepository(session)
            team_repo = TeamRepository(session)
            user = self._user(repo, ref)
            complete_period(user, fields)
            repo.update(user.id, **fields)
            if "teams" in data:
                wanted = {self._team(team_repo, t).id for t in teams or ()}
                for m, team in repo.memberships(user.id):
                    if m.via_admin and team.id not in wanted:
                        repo.set_membership(user.id, team.id, via_admin=False)
                for team_id in wanted:
                    repo.set_membership(user.id, team_id, via_admin=True)
            if "admin_of" in data:
                wanted = {self._team(team_repo, t).id for t in admin_of or ()}
                for _m, team in repo.memberships(user.id):
                    repo.set_membership(user.id, team.id, role="admin" if team.id in wanted else "member")
                current = {t.id for _, t in repo.memberships(user.id)}
                for team_id in wanted - current:  # administering a team makes one a member of it
                    repo.set_membership(user.id, team_id, via_admin=True, role="admin")
            out = user_public(user, repo.memberships(user.id))
        self._changed()
        return out

    # -- the serving path ---------------------------------------------------------------------------------

    def member(self, user_id: str) -> Member | None:
        """The member a key belongs to (None when the user is gone)."""
        with session_scope(self.engine) as session:
            repo = UserRepository(session)
            user = repo.get(user_id)
            return _member(user, repo.memberships(user.id)) if user is not None else None

    def team_level(self, team_id: str) -> tuple[Level, frozenset[str] | None] | None:
        """A team's limit level and allowed models (None when the team is gone)."""
        with session_scope(self.engine) as session:
            team = TeamRepository(session).get(team_id)
            return (team_level(team), _models_of(team)) if team is not None else None

    def resolve_user(
        self,
        *,
        subject: str,
        issuer: str,
        email: str | None = None,
        name: str | None = None,
        groups: Sequence[str] | None = None,
    ) -> Member:
        """Upsert the user (issuer, subject) with the claims it came with and bring its group-derived
        memberships in line with `groups` (None: the claims carry no groups; group memberships are kept);
        admin-assigned memberships are never touched. One read when nothing changed."""
        subject = str(_claim(subject, "subject", required=True))
        issuer = str(_claim(issuer, "issuer", required=True, limit=512))
        email = _claim(email, "email", limit=320)
        name = _claim(name, "name")
        group_list = (
            sorted({g for g in groups or () if isinstance(g, str) and g and "\x00" not in g})[:MAX_GROUPS]
            if groups is not None
            else None
        )
        with session_scope(self.engine) as session:
            repo = UserRepository(session)
            user = repo.get_by_subject(issuer, subject)
            if user is not None and not self._stale(session, user, email, name, group_list):
                return _member(user, repo.memberships(user.id))
        for attempt in range(3):
            try:
                with session_scope(self.engine, write=True) as session:
                    return self._upsert(session, subject, issuer, email, name, group_list)
            except IntegrityError:  # another worker created the user at the same moment: read it again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _wanted_teams(self, session: Any, groups: Sequence[str]) -> set[str]:
        wanted = set(groups)
        return {t.id for t in TeamRepository(session).with_groups() if wanted & set(t.groups or ())}

    def _stale(
        self, session: Any, user: Any, email: str | None, name: str | None, groups: list[str] | None
    ) -> bool:
        """Whether the stored user differs from its claims (or was not seen for SEEN_EVERY)."""
        if (email is not None and user.email != email) or (name is not None and user.name != name):
            return True
        seen = user.last_seen_at
        if seen is None or (utcnow() - seen).total_seconds() >= SEEN_EVERY:
            return True
        if groups is None:
            return False
        if (user.groups or []) != groups:
            return True
        have = {m.team_id for m, _ in UserRepository(session).memberships(user.id) if m.via_groups}
        return have != self._wanted_teams(session, groups)

    def _upsert(
        self,
        session: Any,
        subject: str,
        issuer: str,
        email: str | None,
        name: str | None,
        groups: list[str] | None,
    ) -> Member:
        repo = UserRepository(session)
        user = repo.get_by_subject(issuer, subject)
        now = utcnow()
        if user is None:
            user = repo.create(issuer=issuer, subject=subject, email=email, name=name, groups=groups)
            user.last_seen_at = now
        else:
            changes: dict[str, Any] = {"last_seen_at": now}
            if email is not None:
                changes["email"] = email
            if name is not None:
                changes["name"] = name
            if groups is not None:
                changes["groups"] = groups
            repo.update(user.id, **changes)
        if groups is not None:
            wanted = self._wanted_teams(session, groups)
            for m, team in repo.memberships(user.id):
                if m.via_groups and team.id not in wanted:
                    repo.set_membership(user.id, team.id, via_groups=False)
            for team_id in wanted:
                repo.set_membership(user.id, team_id, via_groups=True)
        session.flush()
        return _member(user, repo.memberships(user.id))


def _claim(value: Any, what: str, *, required: bool = False, limit: int = _TEXT_MAX) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip() and not required):
        if required:
            raise InvalidRequest(f"The identity has no {what}.", param=what, code="invalid_identity")
        return None
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise InvalidRequest(
            f"The identity's {what} is not a usable string.", param=what, code="invalid_identity"
        )
    return value.strip()[:limit]


# ---------------------------------------------------------------------------------------------------------
# The worker's cache


class Members:
    """Resolves identities to Members with the database off the hot path: a member resolved within
    MEMBER_TTL seconds (with the same claims) is served from the worker's memory; concurrent requests of
    one user share one look-up; while the database cannot be reached a member resolved within `stale_s`
    seconds keeps working (else DatabaseUnavailable). Changes made through this worker's OrgStore drop
    the cache at once; those made elsewhere apply within MEMBER_TTL."""

    def __init__(
        self, store: OrgStore, *, guard: DatabaseGuard | None = None, stale_s: float = 300.0
    ) -> None:
        self.store = store
        self.guard = guard or DatabaseGuard(5.0)
        self.stale_s = stale_s
        # (issuer, subject) -> (fresh until, claims, member, fetched at), monotonic clock
        self._cache: dict[tuple[str, str], tuple[float, tuple[Any, ...], Member, float]] = {}
        self._by_user: dict[str, tuple[float, Member | None, float]] = {}
        self._teams: dict[str, tuple[float, tuple[Level, frozenset[str] | None] | None, float]] = {}
        self._fetching: dict[Any, asyncio.Future[Any]] = {}
        store.listeners.append(self.invalidate)

    def invalidate(self) -> None:
        """Look everything up again at its next use; the entries stay as the fallback during an outage."""
        self._cache = {k: (0.0, c, m, at) for k, (_, c, m, at) in self._cache.items()}
        self._by_user = {k: (0.0, m, at) for k, (_, m, at) in self._by_user.items()}
        self._teams = {k: (0.0, t, at) for k, (_, t, at) in self._teams.items()}

    async def _shared(self, key: Any, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """One look-up per key at a time, run by the DatabaseGuard; the others wait for its result."""
        future = self._fetching.get(key)
        if future is None:
            future = asyncio.ensure_future(self.guard.run(what, fn, *args))
            self._fetching[key] = future
            future.add_done_callback(lambda _f: self._fetching.pop(key, None))
        return await asyncio.shield(future)

    async def resolve_user(
        self,
        *,
        subject: str,
        issuer: str,
        email: str | None = None,
        name: str | None = None,
        groups: Sequence[str] | None = None,
    ) -> Member:
        """The member of a verified identity (see OrgStore.resolve_user), cached per worker."""
        key = (issuer, subject)
        claims = (email, name, tuple(sorted(set(groups))) if groups is not None else None)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now and hit[1] == claims:
            return hit[2]
        try:
            member: Member = await self._shared(
                ("resolve", key, claims),
                "user look-up",
                lambda: self.store.resolve_user(
                    subject=subject, issuer=issuer, email=email, name=name, groups=groups
                ),
            )
        except DatabaseUnavailable:
            if hit is not None and now - hit[3] <= self.stale_s:
                _throttle.log(
                    "stale-members",
                    logging.WARNING,
                    "database unreachable: serving users from the worker's cache (entries up to %gs old)",
                    self.stale_s,
                )
                return hit[2]
            raise
        now = time.monotonic()
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (now + MEMBER_TTL, claims, member, now)
        return member

    async def member(self, user_id: str) -> Member | None:
        """The member a key names (cached like resolve_user)."""
        return await self._cached(self._by_user, user_id, "user look-up", self.store.member)  # type: ignore[no-any-return]

    async def team(self, team_id: str) -> tuple[Level, frozenset[str] | None] | None:
        """A team's level and allowed models (cached like resolve_user)."""
        return await self._cached(self._teams, team_id, "team look-up", self.store.team_level)  # type: ignore[no-any-return]

    async def _cached(self, cache: dict[str, Any], key: str, what: str, fn: Callable[[str], Any]) -> Any:
        now = time.monotonic()
        hit = cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            value = await self._shared((what, key), what, fn, key)
        except DatabaseUnavailable:
            if hit is not None and now - hit[2] <= self.stale_s:
                return hit[1]
            raise
        now = time.monotonic()
        if len(cache) >= CACHE_MAX:
            cache.clear()
        cache[key] = (now + MEMBER_TTL, value, now)
        return value


def trusted_issuer(key_id: str) -> str:
    """The issuer of the users a trusted front-end's key names."""
    return f"{TRUSTED_UI_ISSUER}{key_id}"
