"""Redis limiter: one atomic Lua script per acquire and per settle, exact across all workers and replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import weakref
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from .base import (
    DEFAULT_LEASE_S,
    DEFAULT_RATE_WINDOW_S,
    EPSILON,
    NEVER_S,
    PARALLEL_RETRY_AFTER_S,
    Level,
    Limiter,
    LimiterUnavailable,
    LimitExceeded,
    RateLimitState,
    Reservation,
    SeedNeeded,
    rate_state,
    tightest,
    to_micros,
    usage_report,
)

logger = logging.getLogger(__name__)

# Shared by the scripts. Time comes from Redis TIME (plus a test-only offset), never from a client clock,
# so every worker and replica agrees. Lua 5.1 numbers are doubles; calendar maths after H. Hinnant's
# days_from_civil / civil_from_days.
_PRELUDE = """
local EPS = $EPS
local function clock(offset)
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000 + offset
end
local function month_of_day(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)
  yoe = math.floor(yoe / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y * 12 + m - 1
end
local function month_start(month)
  local y = math.floor(month / 12)
  local m = month % 12 + 1
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return (era * 146097 + doe - 719468) * 86400
end
local function drain(level, ts, limit, now, window)
  level = tonumber(level) or 0
  ts = tonumber(ts) or now
  if limit > 0 and now > ts then
    level = math.max(0, level - (now - ts) * limit / window)
  end
  return level
end
local function num(x)
  return string.format('%.17g', x)
end
""".replace("$EPS", repr(EPSILON))

# KEYS: per level its state hash, its in-flight sorted set and its budget-period hash (s1, p1, b1, s2, ...).
# ARGV: time offset, window, reserve, reservation id, lease seconds, seed budgets (1/0), reserved cost
# (millionths), number of levels, then per level: rpm, tpm, max_parallel, daily tokens, monthly tokens,
# daily spend, monthly spend (in millionths; -1 = no limit), period tokens, period spend (-1 = none),
# period start, period end (UTC timestamps; '' = none; a period budget is in force only with an end).
# The period hash is named by the period's start (a new start: a fresh counter): pu/pc its tokens and cost,
# sp set once seeded from the request log; its TTL runs a little past the period's end.
# Hash fields: rl/rt requests bucket level and time, tl/tt tokens bucket, d/du UTC day and its tokens,
# m/mu UTC month and its tokens, dc/mc the day's and the month's cost (millionths), sd/sm the day and month
# whose counters were seeded from the request log. Each sorted set holds every in-flight reservation id of
# its level scored by its lease expiry.
# All levels are checked first and written only if every one admits: one script, so no other acquire can
# come in between and no level overshoots.
_ACQUIRE = (
    _PRELUDE
    + """
local now = clock(tonumber(ARGV[1]))
local window = tonumber(ARGV[2])
local reserve, rid, lease = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cost, n = tonumber(ARGV[7]), tonumber(ARGV[8])
local day = math.floor(now / 86400)
local month = month_of_day(day)
local st = {}
for i = 1, n do
  local b = 8 + (i - 1) * 11
  local L = {rpm = tonumber(ARGV[b + 1]), tpm = tonumber(ARGV[b + 2]), maxpar = tonumber(ARGV[b + 3]),
             daily = tonumber(ARGV[b + 4]), monthly = tonumber(ARGV[b + 5]),
             dspend = tonumber(ARGV[b + 6]), mspend = tonumber(ARGV[b + 7]),
             ptok = tonumber(ARGV[b + 8]), pspend = tonumber(ARGV[b + 9]),
             pstart = tonumber(ARGV[b + 10]), pend = tonumber(ARGV[b + 11])}
  L.period = L.pend ~= nil and (L.ptok >= 0 or L.pspend >= 0)
  L.inside = L.period and (L.pstart == nil or now >= L.pstart) and now < L.pend
  L.pu, L.pc = 0, 0
  local ps = false
  if L.inside then
    local ph = redis.call('HMGET', KEYS[3 * i], 'pu', 'pc', 'sp')
    L.pu, L.pc, ps = tonumber(ph[1]) or 0, tonumber(ph[2]) or 0, ph[3]
  end
  local h = redis.call('HMGET', KEYS[3 * i - 2], 'rl', 'rt', 'tl', 'tt', 'd', 'du', 'm', 'mu', 'sd', 'sm', 'dc', 'mc')
  if ARGV[6] == '1' and (((L.daily >= 0 or L.dspend >= 0) and tonumber(h[9]) ~= day)
                         or ((L.monthly >= 0 or L.mspend >= 0) and tonumber(h[10]) ~= month)
                         or (L.inside and not ps)) then
    return cjson.encode({ok = false, seed = true, level = i, day = day, month = month})
  end
  L.rl = drain(h[1], h[2], L.rpm, now, window)
  L.tl = drain(h[3], h[4], L.tpm, now, window)
  L.du, L.mu, L.dc, L.mc = 0, 0, 0, 0
  if tonumber(h[5]) == day then L.du = tonumber(h[6]) or 0; L.dc = tonumber(h[11]) or 0 end
  if tonumber(h[7]) == month then L.mu = tonumber(h[8]) or 0; L.mc = tonumber(h[12]) or 0 end
  redis.call('ZREMRANGEBYSCORE', KEYS[3 * i - 1], '-inf', now)
  L.inflight = 0
  if L.maxpar >= 0 then L.inflight = redis.call('ZCARD', KEYS[3 * i - 1]) end
  st[i] = L
end

local v = nil
local function consider(retry, kind, limit, used, requested, i)
  if v == nil or retry > v[1] then v = {retry, kind, limit, used, requested, i} end
end
local function budget(limit, used, amount, reset, kind, i)
  if limit >= 0 and (limit == 0 or used + math.min(amount, limit) > limit) then
    consider(reset, kind, limit, used, amount, i)
  end
end
for i = 1, n do
  local L = st[i]
  if L.rpm >= 0 then
    if L.rpm == 0 then consider(window, 'requests', L.rpm, L.rl, 1, i)
    elseif L.rl + 1 > L.rpm + EPS then consider((L.rl + 1 - L.rpm) * window / L.rpm, 'requests', L.rpm, L.rl, 1, i) end
  end
  if L.tpm >= 0 then
    local need = math.min(reserve, L.tpm)
    if L.tpm == 0 then consider(window, 'tokens', L.tpm, L.tl, reserve, i)
    elseif L.tl + need > L.tpm + EPS then
      consider((L.tl + need - L.tpm) * window / L.tpm, 'tokens', L.tpm, L.tl, reserve, i)
    end
  end
  if L.maxpar >= 0 and L.inflight >= L.maxpar then
    consider($PARALLEL_RETRY, 'parallel', L.maxpar, L.inflight, 1, i)
  end
  local to_day, to_month = (day + 1) * 86400 - now, month_start(month + 1) - now
  budget(L.daily, L.du, reserve, to_day, 'daily_budget', i)
  budget(L.monthly, L.mu, reserve, to_month, 'monthly_budget', i)
  budget(L.dspend, L.dc, cost, to_day, 'daily_spend', i)
  budget(L.mspend, L.mc, cost, to_month, 'monthly_spend', i)
  if L.period then
    if L.pstart ~= nil and now < L.pstart then consider(L.pstart - now, 'period_not_started', 0, 0, reserve, i)
    elseif now >= L.pend then consider($NEVER, 'period_ended', 0, 0, reserve, i)
    else
      budget(L.ptok, L.pu, reserve, $NEVER, 'period_budget', i)
      budget(L.pspend, L.pc, cost, $NEVER, 'period_spend', i)
    end
  end
end
local rls, tls = {}, {}
if v ~= nil then
  for i = 1, n do rls[i] = st[i].rl; tls[i] = st[i].tl end
  return cjson.encode({ok = false, retry = v[1], kind = v[2], limit = v[3], used = v[4], requested = v[5],
                       level = v[6], rl = rls, tl = tls})
end

-- Long enough for the month's counter and for settling a request that started just before the month ended.
local ttl = math.ceil(month_start(month + 1) - now + math.max(window, lease))
for i = 1, n do
  local L = st[i]
  if L.rpm >= 0 then L.rl = L.rl + 1 end
  if L.tpm >= 0 then L.tl = L.tl + reserve end
  rls[i], tls[i] = L.rl, L.tl
  redis.call('HSET', KEYS[3 * i - 2], 'rl', num(L.rl), 'rt', num(now), 'tl', num(L.tl), 'tt', num(now),
             'd', day, 'du', num(L.du + reserve), 'm', month, 'mu', num(L.mu + reserve),
             'dc', num(L.dc + cost), 'mc', num(L.mc + cost))
  redis.call('EXPIRE', KEYS[3 * i - 2], ttl)
  redis.call('ZADD', KEYS[3 * i - 1], now + lease, rid)
  redis.call('EXPIRE', KEYS[3 * i - 1], math.ceil(lease) + 1)
  if L.inside then
    redis.call('HSET', KEYS[3 * i], 'pu', num(L.pu + reserve), 'pc', num(L.pc + cost))
    redis.call('EXPIRE', KEYS[3 * i], math.ceil(L.pend - now + math.max(window, lease)))
  end
end
return cjson.encode({ok = true, rl = rls, tl = tls, now = now, day = day, month = month})
""".replace("$PARALLEL_RETRY", repr(PARALLEL_RETRY_AFTER_S)).replace("$NEVER", repr(NEVER_S))
)

# KEYS: per level its state hash, in-flight sorted set and period hash, as for acquire. ARGV: time offset, window,
# reservation id, reserved tokens, actual tokens, acquired at, day, month, reserved cost, actual cost,
# number of levels, then per level its tpm (-1 = none).
# Idempotent per level: the reservation's lease is removed first, and only the call that removed it applies
# the usage to that level. A retried settle whose first attempt did land (its reply was lost) changes
# nothing; neither does a settle after a lease expired (that level then stays booked as reserved: never
# under-counted).
_SETTLE = (
    _PRELUDE
    + """
local now = clock(tonumber(ARGV[1]))
local window = tonumber(ARGV[2])
local reserved, actual = tonumber(ARGV[4]), tonumber(ARGV[5])
local delta = actual - reserved
local cdelta = tonumber(ARGV[10]) - tonumber(ARGV[9])
local n = tonumber(ARGV[11])
local applied = 0
for i = 1, n do
  local s = KEYS[3 * i - 2]
  if redis.call('ZREM', KEYS[3 * i - 1], ARGV[3]) == 1 then
    applied = applied + 1
    if delta ~= 0 or cdelta ~= 0 then
      local tpm = tonumber(ARGV[11 + i])
      local h = redis.call('HMGET', s, 'tl', 'tt', 'd', 'du', 'm', 'mu', 'dc', 'mc')
      -- Only fields that exist are written, so a settle never recreates an expired hash without its TTL.
      if delta ~= 0 and tpm > 0 and h[1] then
        local tl = drain(h[1], h[2], tpm, now, window)
        if delta > 0 then
          tl = tl + delta
        else
          local leaked = math.max(0, now - tonumber(ARGV[6])) * tpm / window
          local refund = math.min(-delta, math.max(0, reserved - leaked))
          tl = math.max(0, tl - refund)
        end
        redis.call('HSET', s, 'tl', num(tl), 'tt', num(now))
      end
      if h[3] == ARGV[7] then
        redis.call('HSET', s, 'du', num(math.max(0, (tonumber(h[4]) or 0) + delta)),
                   'dc', num(math.max(0, (tonumber(h[7]) or 0) + cdelta)))
      end
      if h[5] == ARGV[8] then
        redis.call('HSET', s, 'mu', num(math.max(0, (tonumber(h[6]) or 0) + delta)),
                   'mc', num(math.max(0, (tonumber(h[8]) or 0) + cdelta)))
      end
      -- the level's period counter (named by the reservation's period: only one it was booked on)
      local ph = redis.call('HMGET', KEYS[3 * i], 'pu', 'pc')
      if ph[1] then
        redis.call('HSET', KEYS[3 * i], 'pu', num(math.max(0, tonumber(ph[1]) + delta)),
                   'pc', num(math.max(0, (tonumber(ph[2]) or 0) + cdelta)))
      end
    end
  end
end
return applied
"""
)

# KEYS: state hash, period hash. ARGV: time offset, day, day tokens, month, month tokens, lease seconds,
# window, day cost, month cost (millionths), period tokens, period cost, period end ('' = no period budget).
# Seeds the budget counters of the current day/month once (sd/sm mark it): a counter keeps the larger of
# what it holds and the request log's total. A seed for a day or month that is over is ignored.
_SEED = (
    _PRELUDE
    + """
local now = clock(tonumber(ARGV[1]))
local day = math.floor(now / 86400)
local month = month_of_day(day)
local h = redis.call('HMGET', KEYS[1], 'd', 'du', 'm', 'mu', 'sd', 'sm', 'dc', 'mc')
if tonumber(ARGV[2]) == day and tonumber(h[5]) ~= day then
  local du, dc = 0, 0
  if tonumber(h[1]) == day then du = tonumber(h[2]) or 0; dc = tonumber(h[7]) or 0 end
  redis.call('HSET', KEYS[1], 'd', day, 'du', num(math.max(du, tonumber(ARGV[3]))),
             'dc', num(math.max(dc, tonumber(ARGV[8]))), 'sd', day)
end
if tonumber(ARGV[4]) == month and tonumber(h[6]) ~= month then
  local mu, mc = 0, 0
  if tonumber(h[3]) == month then mu = tonumber(h[4]) or 0; mc = tonumber(h[8]) or 0 end
  redis.call('HSET', KEYS[1], 'm', month, 'mu', num(math.max(mu, tonumber(ARGV[5]))),
             'mc', num(math.max(mc, tonumber(ARGV[9]))), 'sm', month)
end
redis.call('EXPIRE', KEYS[1], math.ceil(month_start(month + 1) - now + math.max(tonumber(ARGV[7]), tonumber(ARGV[6]))))
local pend = tonumber(ARGV[12])
if pend ~= nil and now < pend then
  local ph = redis.call('HMGET', KEYS[2], 'pu', 'pc', 'sp')
  if not ph[3] then
    redis.call('HSET', KEYS[2], 'pu', num(math.max(tonumber(ph[1]) or 0, tonumber(ARGV[10]))),
               'pc', num(math.max(tonumber(ph[2]) or 0, tonumber(ARGV[11]))), 'sp', 1)
    redis.call('EXPIRE', KEYS[2], math.ceil(pend - now + math.max(tonumber(ARGV[7]), tonumber(ARGV[6]))))
  end
end
return 1
"""
)

# KEYS: in-flight sorted set. ARGV: time offset, lease seconds, reservation ids. Extends the leases of
# requests still in flight; a lease that is gone (settled or expired) is not brought back.
_RENEW = (
    _PRELUDE
    + """
local now = clock(tonumber(ARGV[1]))
local lease = tonumber(ARGV[2])
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[i])
end
if renewed > 0 then redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 1) end
return renewed
"""
)

# KEYS: state hash, in-flight sorted set, period hash. ARGV: time offset, window, rpm, tpm. Reads only.
_USAGE = (
    _PRELUDE
    + """
local now = clock(tonumber(ARGV[1]))
local window, rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'd', 'du', 'm', 'mu', 'dc', 'mc')
local day = math.floor(now / 86400)
local month = month_of_day(day)
local du, mu, dc, mc = 0, 0, 0, 0
if tonumber(h[5]) == day then du = tonumber(h[6]) or 0; dc = tonumber(h[9]) or 0 end
if tonumber(h[7]) == month then mu = tonumber(h[8]) or 0; mc = tonumber(h[10]) or 0 end
return cjson.encode({rl = drain(h[1], h[2], rpm, now, window), tl = drain(h[3], h[4], tpm, now, window),
                     inflight = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf'),
                     du = du, mu = mu, dc = dc, mc = mc, now = now, day = day, month = month,
                     pu = tonumber(redis.call('HGET', KEYS[3], 'pu')) or 0,
                     pc = tonumber(redis.call('HGET', KEYS[3], 'pc')) or 0})
"""
)


def _arg(value: int | None) -> int:
    return -1 if value is None else value


def _when(ts: float | None) -> str:
    return "" if ts is None else repr(float(ts))


class RedisLimiter(Limiter):
    """Limits kept in Redis, shared by every worker and replica that uses the same Redis and prefix.

    Each acquire and each settle is one EVALSHA round-trip over a bounded connection pool (max_connections;
    a burst waits up to pool_timeout_s for a connection), however many levels (key, user, team) the request
    counts against. Three keys per level, sharing a hash tag: a hash (buckets, day and month counters of
    tokens and cost; TTL to the end of the month), a sorted set of parallel leases (TTL lease_s) and, for a
    level with a budget period, that period's hash (named by its start; TTL a little past its end). Nothing
    outlives its window. A request on one level works on Redis Cluster; one on several levels touches
    several hash tags, which a cluster refuses unless they share a slot: use a single Redis (or a
    replicated one) for users and teams.

    When Redis cannot be reached: fail_open=True lets the request through unchecked (Reservation.degraded),
    logs an error at most every log_interval_s and counts errors_total/degraded_total; fail_open=False raises
    LimiterUnavailable. After a failure Redis is left alone for retry_interval_s, so an outage costs no
    connect timeout per request.

    A background task (started by the first acquire, stopped by close) renews the leases of this process's
    unsettled reservations every lease_s/3 and retries settles that failed, every retry_interval_s, until
    they land or their lease has run out: a pause of Redis while requests end frees their slots as soon as
    Redis answers again, not when a lease expires.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        prefix: str = "llmb:rl:",
        fail_open: bool = True,
        window_s: float = DEFAULT_RATE_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        timeout_s: float = 1.0,
        max_connections: int = 50,
        pool_timeout_s: float = 5.0,
        retry_interval_s: float = 1.0,
        log_interval_s: float = 30.0,
        time_offset_s: float = 0.0,
        seed_budgets: bool = False,
    ) -> None:
        if isinstance(url_or_client, str):
            # A bounded pool that makes bursts wait for a connection instead of opening one per request.
            pool = aioredis.BlockingConnectionPool.from_url(
                url_or_client,
                max_connections=max_connections,
                timeout=pool_timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),  # one quick retry for a pooled connection Redis has dropped
            )
            self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self.prefix = prefix
        self.fail_open = fail_open
        self.window_s = window_s
        self.lease_s = lease_s
        self.retry_interval_s = retry_interval_s
        self.log_interval_s = log_interval_s
        self.time_offset_s = time_offset_s  # test hook: shifts the scripts' Redis TIME
        self.seed_budgets = seed_budgets
        self.errors_total = 0  # failed Redis calls
        self.degraded_total = 0  # requests let through unchecked (fail open)
        self._down_until = 0.0
        self._last_log = -math.inf
        self._suppressed = 0
        self._acquire = self._client.register_script(_ACQUIRE)
        self._settle = self._client.register_script(_SETTLE)
        self._usage = self._client.register_script(_USAGE)
        self._seed = self._client.register_script(_SEED)
        self._renew = self._client.register_script(_RENEW)
        # unsettled reservations of this process (their leases are renewed) and settles to retry
        self._live: weakref.WeakValueDictionary[str, Reservation] = weakref.WeakValueDictionary()
        # id -> (reservation, tokens, cost, give up at)
        self._pending: dict[str, tuple[Reservation, int, int, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = (
            None  # set when a settle is queued: the loop may be in a long sleep
        )
        self.settle_retries_total = 0  # settles that failed once and were queued for a retry

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self.prefix}{{{key_id}}}"
        return [f"{base}:s", f"{base}:p"]

    def _failed(self, operation: str, exc: BaseException | None) -> None:
        """Count a failure, stop calling Redis for a while and log (at most once per log interval)."""
        now = time.monotonic()
        if exc is not None:
            self.errors_total += 1
            self._down_until = now + self.retry_interval_s
        if now - self._last_log >= self.log_interval_s:
            more = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            logger.error(
                "rate limiter: Redis unavailable during %s: %s%s; %s",
                operation,
                f"{type(exc).__name__}: {exc}" if exc is not None else "backing off",
                more,
                "letting requests through unchecked" if self.fail_open else "refusing requests",
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def _unavailable(
        self, levels: Sequence[Level], reserve: int, cost: int, exc: BaseException | None
    ) -> Reservation:
        self._failed("acquire", exc)
        if not self.fail_open:
            raise LimiterUnavailable("The rate limiter is unavailable; please retry shortly.") from exc
        self.degraded_total += 1
        limits = levels[0].limits
        state = RateLimitState(limit_requests=limits.rpm, limit_tokens=limits.tpm)
        return Reservation(
            key_id=levels[0].counter,
            tokens=reserve,
            state=state,
            limits=limits,
            levels=tuple(levels),
            cost=cost,
            degraded=True,
        )

    def _period_key(self, level: Level) -> str:
        """The level's budget-period hash: named by the period's start, so a new period counts afresh."""
        return f"{self.prefix}{{{level.counter}}}:b:{level.limits.period_id}"

    def _level_keys(self, levels: Sequence[Level]) -> list[str]:
        return [k for level in levels for k in (*self._keys(level.counter), self._period_key(level))]

    async def acquire_levels(
        self, levels: Sequence[Level], reserve_tokens: int, reserve_cost: int = 0
    ) -> Reservation:
        reserve = max(0, int(reserve_tokens))
        cost = max(0, int(reserve_cost))
        if time.monotonic() < self._down_until:
            return self._unavailable(levels, reserve, cost, None)
        rid = secrets.token_hex(8)
        args: list[str | int | float] = [
            self.time_offset_s,
            self.window_s,
            reserve,
            rid,
            self.lease_s,
            1 if self.seed_budgets else 0,
            cost,
            len(levels),
        ]
        for level in levels:
            lim = level.limits
            args += [
                _arg(lim.rpm),
                _arg(lim.tpm),
                _arg(lim.max_parallel),
                _arg(lim.daily_tokens),
                _arg(lim.monthly_tokens),
                _arg(to_micros(lim.daily_spend)),
                _arg(to_micros(lim.monthly_spend)),
                _arg(lim.period_tokens),
                _arg(to_micros(lim.period_spend)),
                _when(lim.period_start),
                _when(lim.period_end),
            ]
        try:
            raw = await self._eval(self._acquire, self._level_keys(levels), args)
        except (RedisError, OSError) as exc:
            return self._unavailable(levels, reserve, cost, exc)
        r = json.loads(raw)
        if r.get("seed"):
            level = levels[int(r["level"]) - 1]
            raise SeedNeeded(level.counter, int(r["day"]), int(r["month"]), level)
        states = [
            rate_state(level.limits, float(rl), float(tl), self.window_s)
            for level, rl, tl in zip(levels, r["rl"], r["tl"], strict=True)
        ]
        if not r["ok"]:
            i = int(r["level"]) - 1
            raise LimitExceeded(
                r["kind"],
                float(r["retry"]),
                states[i],
                limit=int(r["limit"]),
                used=float(r["used"]),
                requested=int(r["requested"]),
                level=levels[i],
            )
        reservation = Reservation(
            key_id=levels[0].counter,
            tokens=reserve,
            state=tightest(states),
            limits=levels[0].limits,
            levels=tuple(levels),
            cost=cost,
            id=rid,
            acquired_at=float(r["now"]),
            day=int(r["day"]),
            month=int(r["month"]),
            parallel_slot=any(level.limits.max_parallel is not None for level in levels),
        )
        self._live[rid] = reservation
        self._start_background()
        return reservation

    async def seed_level(
        self,
        level: Level,
        day: int,
        day_tokens: int,
        month: int,
        month_tokens: int,
        day_cost: int = 0,
        month_cost: int = 0,
        period_tokens: int = 0,
        period_cost: int = 0,
    ) -> None:
        limits = level.limits
        args = [
            self.time_offset_s,
            day,
            int(day_tokens),
            month,
            int(month_tokens),
            self.lease_s,
            self.window_s,
            int(day_cost),
            int(month_cost),
            int(period_tokens),
            int(period_cost),
            _when(limits.period_end) if limits.has_period() else "",
        ]
        try:
            keys = [self._keys(level.counter)[0], self._period_key(level)]
            await self._eval(self._seed, keys, args)
        except (RedisError, OSError) as exc:
            self._failed("seed", exc)
            raise LimiterUnavailable("The rate limiter is unavailable; please retry shortly.") from exc

    async def settle(
        self, reservation: Reservation, actual_tokens: int, actual_cost: int | None = None
    ) -> None:
        """Never raises for an unreachable Redis: the settle is then retried in the background until it
        lands (or the reservation's lease has run out, when it stays charged as reserved)."""
        if reservation.settled or reservation.degraded:
            reservation.settled = True
            return
        reservation.settled = True
        self._live.pop(reservation.id, None)
        actual = max(0, int(actual_tokens))
        cost = reservation.cost if actual_cost is None else max(0, int(actual_cost))
        if not await self._settle_once(reservation, actual, cost):
            self.settle_retries_total += 1
            self._pending[reservation.id] = (reservation, actual, cost, time.monotonic() + self.lease_s)
            self._start_background()
            if self._wake is not None:
                self._wake.set()

    def _levels_of(self, reservation: Reservation) -> tuple[Level, ...]:
        return reservation.levels or (Level("key", reservation.key_id, reservation.limits),)

    async def _settle_once(self, reservation: Reservation, actual: int, cost: int | None = None) -> bool:
        levels = self._levels_of(reservation)
        if cost is None:
            cost = reservation.cost
        args: list[str | int | float] = [
            self.time_offset_s,
            self.window_s,
            reservation.id,
            reservation.tokens,
            actual,
            repr(reservation.acquired_at),
            reservation.day,
            reservation.month,
            reservation.cost,
            cost,
            len(levels),
            *(_arg(level.limits.tpm) for level in levels),
        ]
        try:
            await self._eval(self._settle, self._level_keys(levels), args)
        except (RedisError, OSError) as exc:
            self._failed("settle", exc)
            return False
        return True

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisConnectionError:
            # A restarted server leaves every pooled connection dead, more than one retry on one connection
            # can cover: drop the idle ones and try once more on a fresh connection.
            await self._client.connection_pool.disconnect(inuse_connections=False)
            return await script(keys=keys, args=args)

    # -- background: lease renewal and settle retries ------------------------------------------------------

    def _start_background(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._background(), name="limiter-leases")

    async def _background(self) -> None:
        renew_every = max(0.05, self.lease_s / 3)
        next_renew = time.monotonic() + renew_every
        wake = self._wake
        assert wake is not None
        while self._live or self._pending:
            tick = min(renew_every, self.retry_interval_s) if self._pending else renew_every
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.01, min(tick, next_renew - time.monotonic())))
            if wake.is_set():
                wake.clear()
                # a settle just failed: give the store its back-off before the first retry
                await asyncio.sleep(max(0.0, self._down_until - time.monotonic()))
            now = time.monotonic()
            try:
                if self._pending and now >= self._down_until:
                    await self._retry_pending()
                if now >= next_renew:
                    next_renew = now + renew_every
                    if self._live and time.monotonic() >= self._down_until:
                        await self._renew_live()
            except Exception:  # never let the loop die: leases would stop being renewed
                logger.exception("rate limiter: lease renewal or settle retry failed")

    async def _retry_pending(self) -> None:
        now = time.monotonic()
        for rid, (reservation, actual, cost, give_up) in list(self._pending.items()):
            if give_up <= now:
                del self._pending[rid]  # its lease is gone: the reservation stays booked as reserved
                continue
            if not await self._settle_once(reservation, actual, cost):
                return  # Redis is still away: try again after the back-off
            del self._pending[rid]

    async def _renew_live(self) -> None:
        by_key: dict[str, list[str]] = defaultdict(list)
        for rid, reservation in list(self._live.items()):
            if not reservation.settled:
                for level in self._levels_of(reservation):
                    by_key[level.counter].append(rid)
        for counter, ids in by_key.items():
            try:
                await self._renew(keys=self._keys(counter)[1:], args=[self.time_offset_s, self.lease_s, *ids])
            except (RedisError, OSError) as exc:
                self._failed("lease renewal", exc)
                return

    async def usage_level(self, level: Level) -> dict[str, Any]:
        limits = level.limits
        args = [self.time_offset_s, self.window_s, _arg(limits.rpm), _arg(limits.tpm)]
        try:
            raw = await self._usage(keys=self._level_keys([level]), args=args)
        except (RedisError, OSError) as exc:
            self._failed("usage", exc)
            raise LimiterUnavailable("The rate limiter is unavailable; please retry shortly.") from exc
        r = json.loads(raw)
        return usage_report(
            limits,
            requests_level=float(r["rl"]),
            tokens_level=float(r["tl"]),
            in_flight=int(r["inflight"]),
            day_used=int(r["du"]),
            month_used=int(r["mu"]),
            now=float(r["now"]),
            window_s=self.window_s,
            day_cost=int(r.get("dc") or 0),
            month_cost=int(r.get("mc") or 0),
            period_used=int(r.get("pu") or 0) if limits.has_period() else 0,
            period_cost=int(r.get("pc") or 0) if limits.has_period() else 0,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._pending and time.monotonic() >= self._down_until:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._retry_pending(), timeout=2.0)
        if self._owns_client:
            await self._client.aclose()
