"""Access control on the serving path: who the key is, what it may use, and its limits and budgets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING
from typing import Any

from llm_backend.config import Settings
from llm_backend.db.repositories import hash_api_key
from llm_backend.db.session import DatabaseUnavailable
from llm_backend.errors import AuthenticationFailed, PermissionDenied, RateLimited, ServiceUnavailable
from llm_backend.limits import (
    MICROS,
    KeyLimits,
    Level,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    Reservation,
    SeedNeeded,
    make_limiter,
    month_start,
)
from llm_backend.logthrottle import LogThrottle
from llm_backend.recording.records import Usage
from llm_backend.services.dbguard import DatabaseGuard
from llm_backend.services.keys import KEY_PREFIX, KeyInfo, KeyStore
from llm_backend.services.operations import CHAT_OP, Operation
from llm_backend.services.org import Member, Members, OrgStore, intersect_models, trusted_issuer
from llm_backend.services.pricing import cost_decimal
from llm_backend.services.proxy import Caller
from llm_backend.upstream.router import ModelRoute

logger = logging.getLogger(__name__)

ADMIN = "admin"
CACHE_TTL = 5.0  # seconds a key looked up stays cached in the worker (changes elsewhere apply within it)
NEGATIVE_TTL = 2.0
TOUCH_EVERY = 60.0
CACHE_MAX = 10_000  # cached keys per worker

_throttle = LogThrottle(logger, 60.0)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
#: Response header of a 429 naming the level that refused it: key, user or team.
LEVEL_HEADER = "x-ratelimit-level"
#: Request header choosing which of the caller's teams (id or name) a request counts for.
TEAM_HEADER = "X-LLM-Backend-Team"


def database_unavailable(guard: DatabaseGuard, what: str) -> ServiceUnavailable:
    """The OpenAI-shaped 503 of a request that needs the database while it cannot be reached."""
    return ServiceUnavailable(
        f"The {what} could not be checked: the database is unreachable. Please retry shortly.",
        code="database_unavailable",
        headers={"Retry-After": str(guard.retry_after_s)},
    )


def _no_limits(limits: KeyLimits) -> bool:
    return all(
        v is None
        for v in (limits.rpm, limits.tpm, limits.max_parallel, limits.daily_tokens, limits.monthly_tokens)
    )


class Authenticator:
    """Resolves a presented key to a principal: one hash and a cached lookup per request.

    A key is looked up again CACHE_TTL seconds after its last look-up (one query for all the requests that
    need it meanwhile). While the database cannot be reached, a key seen within the last `stale_s` seconds
    keeps working from the cache; any other key gets a 503 with Retry-After (never a 401: it may well be
    valid). A key changed through this worker's KeyStore (disabled, edited, deleted) is replaced in the
    cache at once, so a disabled key stops here even if the database goes away right after.
    """

    def __init__(
        self,
        store: KeyStore | None,
        admin_key: str | None,
        *,
        auth_required: bool,
        guard: DatabaseGuard | None = None,
        stale_s: float = 300.0,
        members: Members | None = None,
        user_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.store = store
        self.admin_key = admin_key
        self.members = members
        # (field, lower-case header) pairs of the end user a trusted front-end names
        self.user_headers = tuple((f, h.lower()) for f, h in user_headers)
        self.auth_required = auth_required
        self.guard = guard or DatabaseGuard(5.0)
        self.stale_s = stale_s
        # sha256 of the secret -> (fresh until, key or None, fetched at) on the monotonic clock
        self._cache: dict[str, tuple[float, KeyInfo | None, float]] = {}
        self._by_id: dict[str, str] = {}  # key id -> its digest, for changes made through the KeyStore
        self._fetching: dict[str, asyncio.Task[KeyInfo | None]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        if store is not None:
            store.listeners.append(self.key_changed)

    def invalidate(self) -> None:
        """Look every key up again at its next use; the entries stay as the fallback during an outage."""
        self._cache = {d: (0.0, info, at) for d, (_, info, at) in self._cache.items() if info is not None}

    def key_changed(self, key_id: str, info: KeyInfo | None) -> None:
        """The KeyStore changed a key (info None: deleted). Runs in the thread that made the change."""
        digest = self._by_id.get(key_id)
        if digest is None:
            return
        if info is None:
            self._cache.pop(digest, None)
            self._by_id.pop(key_id, None)
        else:
            now = time.monotonic()
            self._cache[digest] = (now + CACHE_TTL, info, now)

    async def lookup(self, secret: str) -> KeyInfo | None:
        now = time.monotonic()
        digest = hash_api_key(secret)  # the cache holds hashes, never secrets
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.store is None:
            return None
        task = self._fetching.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(digest))
            self._fetching[digest] = task
            task.add_done_callback(lambda _t: self._fetching.pop(digest, None))
        try:
            return await asyncio.shield(task)  # a caller that goes away does not cancel the others' look-up
        except DatabaseUnavailable:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] is not None and now - hit[2] <= self.stale_s:
                _throttle.log(
                    "stale-keys",
                    logging.WARNING,
                    "database unreachable: serving API keys from the worker's cache (entries up to %gs old)",
                    self.stale_s,
                )
                return hit[1]
            raise database_unavailable(self.guard, "API key") from None

    async def _fetch(self, digest: str) -> KeyInfo | None:
        assert self.store is not None
        info = await self.guard.run("key look-up", self.store.find_hash, digest)
        now = time.monotonic()
        if len(self._cache) >= CACHE_MAX:
            self._evict(now)
        self._cache[digest] = (now + (CACHE_TTL if info is not None else NEGATIVE_TTL), info, now)
        if info is not None:
            self._by_id[info.id] = digest
        return info

    def _evict(self, now: float) -> None:
        """Drop unknown keys and keys too old to serve even during an outage; if that is not enough, all."""
        keep = {d: e for d, e in self._cache.items() if e[1] is not None and now - e[2] <= self.stale_s}
        if len(keep) >= CACHE_MAX * 0.9:
            keep = {}
        self._cache = keep
        self._by_id = {e[1].id: d for d, e in keep.items() if e[1] is not None}

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(key_id, 0.0) < TOUCH_EVERY or self.store is None:
            return
        if len(self._touched) >= CACHE_MAX:
            self._touched.clear()
        self._touched[key_id] = now
        task = asyncio.get_running_loop().create_task(self._touch_later(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch_later(self, key_id: str) -> None:
        try:
            assert self.store is not None
            await self.guard.run("last-use update", self.store.touch, key_id)
        except DatabaseUnavailable:
            pass  # logged by the guard; last use is informative only
        except Exception as exc:
            _throttle.log("touch", logging.WARNING, "could not update the last use of a key: %s", exc)

    async def __call__(
        self, token: str, caller: Caller, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        if self.admin_key and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            caller.is_admin = True
            caller.key_id = None
            caller.log["key"] = ADMIN
            if chosen_team(headers) is not None:
                raise team_not_allowed()
            return {"sub": ADMIN, "admin": True}
        if not self.auth_required:
            if chosen_team(headers) is not None:
                raise team_not_allowed()
            return {"sub": "anonymous"}
        info = await self.lookup(token) if token.startswith(KEY_PREFIX) else None
        if info is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. You can get an API key from your llm-backend administrator."
            )
        if not info.enabled:
            raise AuthenticationFailed(f"The API key {info.key_prefix}… is disabled.", code="invalid_api_key")
        if info.expired():
            raise AuthenticationFailed(f"The API key {info.key_prefix}… has expired.", code="invalid_api_key")
        if not info.ip_allowed(caller.client_ip):
            raise PermissionDenied(
                f"The API key {info.key_prefix}… may not be used from {caller.client_ip}.",
                code="ip_not_allowed",
            )
        caller.key_id = info.id
        caller.key_name = info.name
        caller.allowed_models = info.allowed_models
        caller.limits = info.limits
        caller.log["key"] = f"{info.key_prefix}… ({info.name})"
        self._touch(info.id)
        if info.team_id or info.user_id or headers:
            await self._org(info, caller, headers)  # refuses a team header the key cannot use
        return {"sub": info.id, "name": info.name}

    def trusted_user(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The end user a front-end names in `headers` (field -> value, printable, bounded), first header
        of each field that is present."""
        out: dict[str, str] = {}
        if not headers:
            return out
        for field, header in self.user_headers:
            if field in out:
                continue
            raw = headers.get(header)
            if raw:
                # header bytes arrive as latin-1; front-ends send UTF-8 (names with accents)
                try:
                    raw = raw.encode("latin-1").decode("utf-8")
                except (UnicodeEncodeError, UnicodeDecodeError):
                    pass
                value = _CONTROL.sub("", raw).strip()[:255]
                if value:
                    out[field] = value
        return out

    async def _org(self, info: KeyInfo, caller: Caller, headers: Mapping[str, str] | None) -> None:
        """Who the request counts for besides the key: the end user a trusted front-end names, else the
        key's user; and the key's team, else that user's."""
        named = self.trusted_user(headers)
        members = self.members
        member = None
        team = None
        try:
            if named and not info.trusted_ui:
                caller.log["user_headers_ignored"] = True  # only a trusted_ui key may name its user
            elif named.get("id") and members is not None:
                member = await members.resolve_user(
                    subject=named["id"],
                    issuer=trusted_issuer(info.id),
                    email=named.get("email"),
                    name=named.get("name"),
                    groups=None,
                )
                caller.log["trusted_user"] = named["id"]
                if "role" in named:
                    caller.log["trusted_user_role"] = named["role"]
            if member is None and info.user_id and members is not None:
                member = await members.member(info.user_id)
            if info.team_id and members is not None:
                team = await members.team(info.team_id)
        except DatabaseUnavailable:
            raise database_unavailable(self.guard, "user or team") from None
        if member is not None and not member.enabled:
            raise PermissionDenied(
                "The user this request is made for is disabled.", param="user", code="user_disabled"
            )
        apply_member(caller, member, team=team, chosen=chosen_team(headers))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task


def chosen_team(headers: Mapping[str, str] | None) -> str | None:
    """The team a request's X-LLM-Backend-Team header names (None: no header, or an empty one)."""
    raw = headers.get(TEAM_HEADER.lower()) if headers else None
    if not raw:
        return None
    try:  # header bytes arrive as latin-1; team names may be UTF-8
        raw = raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        pass
    return raw.strip() or None


def team_not_allowed() -> PermissionDenied:
    """The 403 of a team header naming a team the caller may not count for (unknown teams alike: the
    answer does not tell whether a team exists)."""
    return PermissionDenied(
        f"The team named by the {TEAM_HEADER} header is not one this caller may use: name one of your own "
        "teams (by id or name), or leave the header out to use your default team.",
        param=TEAM_HEADER,
        code="team_not_allowed",
    )


def apply_member(
    caller: Caller,
    member: Member | None,
    *,
    team: tuple[Level, frozenset[str] | None] | None = None,
    chosen: str | None = None,
) -> None:
    """Make the request count for `member` (None: no user) and for `team` (a level and its allowed
    models; None: the member's own team): the user and team it is attributed to, their limit levels
    beside the key's, and only the models every one of them allows.

    `chosen` is the team the request asks for (X-LLM-Backend-Team, an id or name): it must be `team`
    when that is given (a key's own team), else one of the member's teams; anything else raises the
    403 of team_not_allowed, with the request attributed to its user alone.

    For a caller without a key (an OIDC token) call it with the member alone."""
    levels: list[Level] = []
    allowed = [caller.allowed_models]
    if chosen is not None:
        if team is not None:
            ok = chosen in (team[0].id, team[0].name)
        else:
            tid = member.find_team(chosen) if member is not None else None
            ok = tid is not None
            if member is not None and tid is not None:
                team = (member.team_levels[tid], member.team_models.get(tid))
        if not ok:
            if member is not None:
                caller.member = member
                caller.user_id = member.user_id
            raise team_not_allowed()
        caller.log["team_chosen"] = team[0].id if team is not None else None
    if member is not None:
        caller.member = member
        caller.user_id = member.user_id
        levels.append(member.user_level)
        allowed.append(member.user_models)
        if team is None and member.team_id is not None:
            level = member.team_levels[member.team_id]
            team = (level, member.allowed_models)  # the user's and its team's allowance
    if team is not None:
        caller.team_id = team[0].id
        levels.append(team[0])
        allowed.append(team[1])
    caller.levels = tuple(levels)
    caller.allowed_models = intersect_models(*allowed)


def reserve_cost(prices: Any, tokens: int) -> int:
    """What a request's reserved tokens may cost at most, in millionths: each token at the dearer of the
    model's input and output prices (per million tokens, so a token costs `price` millionths)."""
    if prices is None or tokens <= 0:
        return 0
    return math.ceil(tokens * max(prices.input, prices.output, prices.cached_input) - 1e-9)


def actual_cost(prices: Any, usage: Usage | None, total_tokens: int) -> int:
    """What a request cost, in millionths, rounded up (exact decimal arithmetic, see services.pricing)."""
    if prices is None:
        return 0
    if usage is None:  # only a total is known: at the dearer price, as reserved
        return reserve_cost(prices, total_tokens)
    exact = cost_decimal(
        prices,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )
    return int((exact * MICROS).to_integral_value(rounding=ROUND_CEILING))


@dataclass(slots=True)
class _Admission:
    limiter: Limiter
    reservation: Any
    headers: dict[str, str]
    prices: Any = None  # the model's prices: the real cost is settled on spend budgets

    async def settle(self, total_tokens: int, usage: Usage | None = None) -> None:
        cost = actual_cost(self.prices, usage, total_tokens) if total_tokens > 0 else 0
        await self.limiter.settle(self.reservation, total_tokens, cost)


def _without_budgets(level: Level) -> Level:
    limits = dataclasses.replace(
        level.limits,
        daily_tokens=None,
        monthly_tokens=None,
        daily_spend=None,
        monthly_spend=None,
        period_tokens=None,
        period_spend=None,
    )
    return dataclasses.replace(level, limits=limits)


class Gate:
    """Reserves a request's tokens (and its estimated cost) on every level it counts against — its key,
    its user, its team — before forwarding; settled after with the real usage and cost.

    Budget counters the limiter has lost (SeedNeeded: Redis restarted or flushed, a fresh worker with the
    in-process limiter, a new day) are re-seeded from the request log before the level's next admission:
    one query per level and window, shared by the requests that wait for it, run by the DatabaseGuard. The
    rule against double counting (a budget period's counter likewise, from the log's sum over the period):
    while a window is unseeded the limiter admits nothing for the level, so
    the store's counter holds none of the requests the log will report; the seed then keeps the larger of
    the two (see Limiter.seed_level), which also covers a budget added in the middle of a day. Requests
    that ended before the loss but are not yet written by the recorder (a fraction of a second of traffic)
    are the one thing the seed cannot see.

    If the request log cannot be read: with LIMITER_FAIL_OPEN (the default) the request is admitted on its
    per-minute and parallel limits, its tokens counted but its budgets not checked, until a later request
    seeds the window; with fail-closed it gets a 503.
    """

    def __init__(
        self,
        limiter: Limiter,
        default_max_tokens: int,
        *,
        store: KeyStore | None = None,
        guard: DatabaseGuard | None = None,
        fail_open: bool = True,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self.on_refusal = on_refusal  # metrics: the limit that refused a request (or limiter_unavailable)
        self.default_max_tokens = default_max_tokens
        self.store = store
        self.guard = guard or DatabaseGuard(5.0)
        self.fail_open = fail_open
        self._seeding: dict[tuple[str, int, int, str], asyncio.Task[bool]] = {}

    @staticmethod
    def levels(caller: Caller) -> list[Level]:
        """The levels a request counts against that have any limit: its key's, then its user's and team's."""
        levels: list[Level] = []
        limits = caller.limits
        if caller.key_id is not None and limits is not None and not limits.unlimited():
            levels.append(Level("key", caller.key_id, limits, name=caller.key_name))
        levels.extend(level for level in caller.levels if not level.limits.unlimited())
        return levels

    async def __call__(
        self, caller: Caller, route: ModelRoute, body: dict[str, Any], operation: Operation = CHAT_OP
    ) -> _Admission | None:
        levels = self.levels(caller)
        if not levels:
            return None
        # the operation's own estimate (embeddings, for one, reserve only their input)
        reserve = operation.reserve(body, self.default_max_tokens)
        prices = getattr(getattr(route, "config", None), "prices", None)
        cost = reserve_cost(prices, reserve)
        try:
            reservation = await self._acquire(levels, reserve, cost)
        except LimitExceeded as exc:
            if self.on_refusal is not None:
                self.on_refusal(exc.kind)
            kind = exc.level_kind
            caller.log["limited_by"] = kind
            headers = {**exc.state.headers(), LEVEL_HEADER: kind}
            if exc.retryable:  # not for a spent or ended budget period: waiting does not help
                headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            raise RateLimited(
                exc.message,
                code=exc.code,
                param=kind,
                error_type="insufficient_quota" if exc.budget else "rate_limit_error",
                headers=headers,
            ) from None
        except LimiterUnavailable:
            if self.on_refusal is not None:
                self.on_refusal("limiter_unavailable")
            raise ServiceUnavailable(
                "The rate limiter is unavailable and this server is set to refuse requests it cannot count "
                "(LIMITER_FAIL_OPEN=false). Try again shortly.",
                code="limiter_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return _Admission(self.limiter, reservation, reservation.headers(), prices)

    async def _acquire(self, levels: list[Level], reserve: int, cost: int) -> Reservation:
        for _ in range(2 + len(levels)):  # each level may need its seed once
            try:
                return await self.limiter.acquire_levels(levels, reserve, cost)
            except SeedNeeded as need:
                try:
                    seeded = await self._seed(need)
                except LimiterUnavailable:
                    if not self.fail_open:
                        raise
                    seeded = True  # the next acquire finds the store in its back-off: admitted unchecked
                if not seeded:
                    break
        if not self.fail_open:
            raise database_unavailable(self.guard, "token budget")
        return await self.limiter.acquire_levels([_without_budgets(lv) for lv in levels], reserve, cost)

    async def _seed(self, need: SeedNeeded) -> bool:
        """Seed a level's budget windows once (per worker) from the request log; False if it cannot be read."""
        if self.store is None:
            await self.limiter.seed_level(need.level, need.day, 0, need.month, 0)
            return True
        window = (need.level.counter, need.day, need.month, need.level.limits.period_id)
        task = self._seeding.get(window)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_and_seed(need))
            self._seeding[window] = task
            task.add_done_callback(lambda _t: self._seeding.pop(window, None))
        return await asyncio.shield(task)

    async def _load_and_seed(self, need: SeedNeeded) -> bool:
        assert self.store is not None
        level = need.level
        limits = level.limits
        day_start = datetime.fromtimestamp(need.day * 86400, UTC)
        first_of_month = datetime.fromtimestamp(month_start(need.month), UTC)
        try:
            day_tokens, month_tokens, day_cost, month_cost = await self.guard.run(
                "budget seeding", self.store.level_totals, level.kind, level.id, day_start, first_of_month
            )
            period_tokens, period_cost = 0, 0.0
            if limits.has_period():
                assert limits.period_end is not None
                start = limits.period_start
                period_tokens, period_cost = await self.guard.run(
                    "budget seeding",
                    self.store.period_totals,
                    level.kind,
                    level.id,
                    datetime.fromtimestamp(start, UTC) if start is not None else None,
                    datetime.fromtimestamp(limits.period_end, UTC),
                )
        except DatabaseUnavailable:
            return False
        await self.limiter.seed_level(
            level,
            need.day,
            day_tokens,
            need.month,
            month_tokens,
            math.ceil(day_cost * MICROS - 1e-6),
            math.ceil(month_cost * MICROS - 1e-6),
            period_tokens,
            math.ceil(period_cost * MICROS - 1e-6),
        )
        _throttle.log(
            "seeded",
            logging.INFO,
            "budget counters of %s %s seeded from the request log: %d tokens (cost %.6f) today, "
            "%d (cost %.6f) this month%s",
            level.kind,
            level.id,
            day_tokens,
            day_cost,
            month_tokens,
            month_cost,
            f", {period_tokens} (cost {period_cost:.6f}) in its budget period" if limits.has_period() else "",
        )
        return True


async def setup_access(settings: Settings, resources: Any, stack: contextlib.AsyncExitStack) -> None:
    store = KeyStore(resources.engine) if resources.engine is not None else None
    resources.key_store = store
    org = OrgStore(resources.engine) if resources.engine is not None else None
    resources.org = org
    keys = settings.auth == "keys"
    if not keys:
        logger.warning(
            "LLM_BACKEND_AUTH=none: every caller is accepted without an API key and no limits apply; "
            "never run this way where anyone else can reach the port"
        )
    if not settings.admin_key:
        logger.info("LLM_BACKEND_ADMIN_KEY is not set: the /admin routes are disabled")
    guard = DatabaseGuard(settings.db_statement_timeout_s)
    stack.callback(guard.close)
    members = Members(org, guard=guard, stale_s=settings.key_cache_stale_s) if org is not None else None
    resources.members = members
    authenticator = Authenticator(
        store,
        settings.admin_key,
        auth_required=keys,
        guard=guard,
        stale_s=settings.key_cache_stale_s,
        members=members,
        user_headers=settings.trusted_user_headers,
    )
    if org is not None:  # a team or user changed through this worker: its keys' levels are looked up again
        org.listeners.append(authenticator.invalidate)
    stack.push_async_callback(authenticator.aclose)
    resources.authenticator = authenticator
    resources.metrics.sampled_counter(
        "llm_backend_database_errors",
        "Database calls of the serving path that failed or timed out (key look-ups, budget seeding).",
        lambda: guard.failures_total,
    )
    if not keys:
        return
    limiter = make_limiter(
        settings.redis_url,
        fail_open=settings.limiter_fail_open,
        lease_s=settings.limiter_lease_s,
        seed_budgets=store is not None,
        timeout_s=settings.redis_timeout_s,
    )
    stack.push_async_callback(limiter.close)
    resources.limiter = limiter
    resources.admit = Gate(
        limiter,
        settings.default_max_tokens,
        store=store,
        guard=guard,
        fail_open=settings.limiter_fail_open,
        on_refusal=resources.metrics.limiter_refused,
    )
    if not settings.redis_url and settings.web_concurrency > 1:
        logger.warning(
            "rate limits are kept in each worker's memory (no REDIS_URL) while %d workers run: a key's limits "
            "apply per worker, not in total; set REDIS_URL to enforce them exactly",
            settings.web_concurrency,
        )
    if hasattr(limiter, "settle_retries_total"):
        resources.metrics.sampled_counter(
            "llm_backend_limiter_settle_retries",
            "Settles that could not reach Redis at once and were retried in the background.",
            lambda: limiter.settle_retries_total,  # type: ignore[attr-defined]
        )
    resources.metrics.sampled_counter(
        "llm_backend_limiter_errors",
        "Rate-limiter store errors (stays 0 with the in-memory limiter).",
        lambda: getattr(limiter, "errors_total", 0),
    )
