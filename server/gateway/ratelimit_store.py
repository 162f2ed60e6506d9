"""The per-key counts in Redis (--rate-limit-store), shared by every gateway process and replica.

Each decision is one server-side Lua script (EVALSHA): one round trip, atomic, on Redis's own clock (TIME), so
neither a race between replicas nor their clocks can let a key past its limits. Per key, named by the key's name
(the `{name}` hash tag keeps a key's counts on one Redis Cluster slot):

    dsv2:ratelimit:{<name>}:requests   hash {level, t}: tokens left as of t (ms, Redis time); expires when full
    dsv2:ratelimit:{<name>}:tokens     the same for tokens per minute
    dsv2:ratelimit:{<name>}:sequences  sorted set of leases "<cost>:<holder>:<n>", scored by when they lapse (ms);
                                       expires with its last lease

A bucket that would have refilled is deleted by its expiry, the same as a full one, and an idle key costs
nothing. A request's lease lasts --rate-limit-lease-seconds and is renewed every third of it while the request
runs, so the sequences of a gateway that died (SIGKILL, a lost node) are free again within a lease.

A dead Redis must not stall requests: short socket timeouts, one retry on a fresh connection (Redis restarted),
and after two failures in a row every check fails at once for STORE_RETRY_AFTER_S before the store is tried
again. Failures
count in dsv2_rate_limit_store_errors_total and set dsv2_rate_limit_store_up to 0; the log says so once, then at
most every LOG_EVERY_S, and again when the store is back. What a failed check means for the request is decided by
ratelimits.RateLimits (--rate-limit-failure).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from server.gateway.metrics import GatewayMetrics
from server.gateway.ratelimits import STORE_RETRY_AFTER_S, Lease, StoreUnavailable, Taken, Window, capacity
from server.gateway.tenants import Tenant

log = logging.getLogger("dsv2.ratelimit")

T = TypeVar("T")

TIMEOUT_S = 0.5  # connect and socket timeout of each call
FAILURES_TO_HOLD = 2  # failures in a row after which checks fail at once for a while (StoreHealth)
LOG_EVERY_S = 30.0
PREFIX = "dsv2:ratelimit:"

# One take from a key's limits, all or nothing. KEYS: its token buckets (hashes {level, t}: the tokens left as of
# t, in ms of Redis time; a missing bucket is full), then, when sequences are leased, its leases (a sorted set).
# ARGV[1]: 1 when every amount must fit now (else they are taken regardless: a settlement may leave a bucket below
# zero); ARGV[2]: the number of buckets; then per bucket its capacity (a minute's allowance) and the amount to
# take (0: look only; negative: give back, never above the capacity); then, for a lease: the key's max_sequences,
# the request's cost, the lease's member ("<cost>:..."), the lease in ms. Lapsed leases (their holder stopped
# renewing) are dropped first. Returns what refused (0: nothing, and everything was taken; i <= buckets: that
# bucket; buckets + 1: the sequences), ms until the refused bucket's amount fits, the key's sequences in flight
# (the new lease's included), and per bucket the whole tokens left and ms until it is full.
TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local fit = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local levels, refused, wait = {}, 0, 0
for i = 1, n do
  local capacity, amount = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local level = capacity
  local state = redis.call('HMGET', KEYS[i], 'level', 't')
  if state[1] then
    local elapsed = math.max(0, now - tonumber(state[2]))
    level = math.min(capacity, tonumber(state[1]) + elapsed * capacity / 60000)
  end
  levels[i] = level
  if fit and refused == 0 and amount > 0 and amount > level then
    refused, wait = i, math.ceil((amount - level) * 60000 / capacity)
  end
end
local leases, held = KEYS[n + 1], 0
if leases then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  for _, member in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    held = held + tonumber(string.match(member, '^%d+'))
  end
  local cost = tonumber(ARGV[4 + 2 * n])
  if refused == 0 and held + cost > tonumber(ARGV[3 + 2 * n]) then
    refused = n + 1
  elseif refused == 0 then
    held = held + cost
    redis.call('ZADD', leases, now + tonumber(ARGV[6 + 2 * n]), ARGV[5 + 2 * n])
    local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', leases, math.ceil(tonumber(last[2])))
  end
end
local out = {refused, wait, held}
for i = 1, n do
  local capacity, amount = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local level = levels[i]
  if refused == 0 and amount ~= 0 then
    level = math.min(capacity, level - amount)
    redis.call('HSET', KEYS[i], 'level', level, 't', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((capacity - level) * 60000 / capacity) + 1000)
  end
  out[#out + 1] = math.max(0, math.floor(level))
  out[#out + 1] = math.ceil((capacity - level) * 60000 / capacity)
end
return out
"""

# Renew a holder's leases of one key. KEYS[1]: the key's leases; ARGV[1]: the lease in ms, then the members.
# A member already gone (lapsed, or released meanwhile) is not added back. Returns the members not found.
RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local lapse = now + tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', lapse, ARGV[i]) == 0 then
    missing[#missing + 1] = ARGV[i]
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIREAT', KEYS[1], math.ceil(tonumber(last[2])))
end
return missing
"""


def redacted(url: str) -> str:
    """The store's URL without credentials or query (`redis://host:6379/0`), for messages, logs and labels."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class StoreHealth:
    """Whether the store answers: a failure counts, marks it down, and is logged (once, then every LOG_EVERY_S).
    After FAILURES_TO_HOLD in a row (one timeout may be a stalled moment, two are a store that does not answer),
    checks fail at once until STORE_RETRY_AFTER_S has passed and the store is tried again; a success clears it."""

    def __init__(self, store: str, metrics: GatewayMetrics, consequence: str) -> None:
        self.store = store
        self.errors = metrics.rate_limit_store_errors
        self.up_gauge = metrics.rate_limit_store_up.labels(store)
        self.consequence = consequence
        self.up = True
        self.failures = 0  # in a row
        self.retry_at = 0.0
        self.logged_at = -LOG_EVERY_S
        self.unlogged = 0

    def check(self, operation: str) -> None:
        if self.failures >= FAILURES_TO_HOLD and time.monotonic() < self.retry_at:
            self.errors.labels(operation).inc()
            self.unlogged += 1
            raise StoreUnavailable(self.store)

    def failed(self, operation: str, exc: BaseException) -> StoreUnavailable:
        now = time.monotonic()
        self.errors.labels(operation).inc()
        self.up_gauge.set(0)
        self.failures += 1
        self.retry_at = now + STORE_RETRY_AFTER_S
        if self.up or now - self.logged_at >= LOG_EVERY_S:
            more = f" ({self.unlogged} more failed check(s) since the last message)" if self.unlogged else ""
            log.warning("rate-limit store %s failed on %s: %s: %s; %s%s", self.store, operation,
                        type(exc).__name__, exc, self.consequence, more)  # fmt: skip
            self.logged_at, self.unlogged = now, 0
        else:
            self.unlogged += 1
        self.up = False
        return StoreUnavailable(self.store)

    def ok(self) -> None:
        if not self.up:
            log.info("rate-limit store %s is reachable again: per-key limits are enforced", self.store)
            self.up, self.unlogged = True, 0
        self.failures = 0
        self.up_gauge.set(1)


class RedisCounters:
    """ratelimits.Counters in Redis: the two scripts above, the leases this process holds, and their renewal."""

    def __init__(self, url: str, metrics: GatewayMetrics, lease_seconds: float, fail_open: bool) -> None:
        self.store = redacted(url)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            # One retry, on a fresh connection, for a connection that broke (a restarted Redis); none for a
            # timeout, which would only double the wait.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.take_script = self.client.register_script(TAKE)
        self.renew_leases = self.client.register_script(RENEW)
        self.lease_ms = max(1, round(lease_seconds * 1000))
        consequence = (
            "admitting the requests of keys with limits uncounted (--rate-limit-failure open)"
            if fail_open
            else "refusing the requests of keys with limits with 503 (--rate-limit-failure closed)"
        )
        self.health = StoreHealth(self.store, metrics, consequence)
        # This process's leases, renewed while their requests run: the set's key -> members.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.leases: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        self._renewer: asyncio.Task | None = None
        self._releases: set[asyncio.Task] = set()

    async def open(self) -> None:
        """Renew leases from now on; a first ping says whether the store answers (it is not required)."""
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        try:
            await self._call("ping", self.client.ping)
            log.info("per-key limits are counted in %s", self.store)
        except StoreUnavailable:
            pass

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._releases:
            await asyncio.wait(self._releases, timeout=2 * TIMEOUT_S)
        await self.client.aclose()

    async def take(self, tenant: Tenant, amounts: dict[str, int], fit: bool, sequences: int = 0) -> Taken:
        kinds = list(amounts)
        keys = [_key(tenant, kind) for kind in kinds]
        limits = [capacity(tenant, kind) or 0 for kind in kinds]
        args = [int(fit), len(kinds)]
        for limit, kind in zip(limits, kinds, strict=True):
            args += [limit, amounts[kind]]
        lease = None
        if sequences:
            lease = Lease(
                _key(tenant, "sequences"), sequences, f"{sequences}:{self.holder}:{next(self._ids)}"
            )
            keys.append(lease.key)
            args += [tenant.max_sequences, sequences, lease.member, self.lease_ms]
            # Renewed from now on: cancelled while the script runs, the request may hold the lease all the same.
            self.leases.setdefault(lease.key, set()).add(lease.member)
        operation = "admit" if sequences else "buckets"
        try:
            out = await self._call(operation, lambda: self.take_script(keys=keys, args=args))
        except asyncio.CancelledError:
            if lease is not None:
                self.release(lease)
            raise
        except BaseException:
            if lease is not None:
                self._forget(lease)  # a lease the script may have added all the same lapses unrenewed
            raise
        refused, wait_ms, held = int(out[0]), int(out[1]), int(out[2])
        windows = {
            kind: Window(limit, int(out[3 + 2 * i]), int(out[4 + 2 * i]) / 1000)
            for i, (kind, limit) in enumerate(zip(kinds, limits, strict=True))
        }
        if refused:
            if lease is not None:
                self._forget(lease)
            what = kinds[refused - 1] if refused <= len(kinds) else "sequences"
            return Taken(windows, what, wait_ms / 1000, held=held)
        return Taken(windows, lease=lease, held=held)

    def release(self, lease: Lease) -> None:
        """Forget the lease now; remove it from Redis in a task of its own, which the cancellation of the request
        that ends cannot lose (a removal that fails leaves the lease to lapse)."""
        self._forget(lease)
        task = asyncio.get_running_loop().create_task(
            self._call("release", lambda: self.client.zrem(lease.key, lease.member))
        )
        self._releases.add(task)
        task.add_done_callback(self._released)

    async def renew(self) -> None:
        """Push the lapse of every lease this process holds a lease ahead, in one round trip; with none, a ping
        (dsv2_rate_limit_store_up stays current, and a store that is back is found without a request)."""
        held = {key: sorted(members) for key, members in self.leases.items() if members}
        if not held:
            await self._call("ping", self.client.ping)
            return

        async def renew_all() -> list:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, members in held.items():
                    await self.renew_leases(keys=[key], args=[self.lease_ms, *members], client=pipe)
                return await pipe.execute()

        missing = await self._call("renew", renew_all)
        for key, gone in zip(held, missing, strict=True):
            lost = [m for m in (g.decode() for g in gone) if m in self.leases.get(key, ())]
            if lost:  # their requests ran unrenewed past a lease (a stall, a store outage): no longer counted
                log.warning("%d sequence lease(s) of %s lapsed while their requests ran; they are not counted "
                            "until those requests end", len(lost), key)  # fmt: skip
                for member in lost:
                    self.leases[key].discard(member)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.renew()
            except StoreUnavailable:
                pass
            except Exception:
                log.exception("renewing the sequence leases failed")

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        self.health.check(operation)
        try:  # a bound on the whole call, its retry and reconnection included
            async with asyncio.timeout(4 * TIMEOUT_S):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self.health.failed(operation, exc) from exc
        self.health.ok()
        return result

    def _forget(self, lease: Lease) -> None:
        members = self.leases.get(lease.key)
        if members is not None:
            members.discard(lease.member)
            if not members:
                del self.leases[lease.key]

    def _released(self, task: asyncio.Task) -> None:
        self._releases.discard(task)
        if not task.cancelled():
            task.exception()  # a failed removal was counted and logged; the lease lapses


def _key(tenant: Tenant, kind: str) -> str:
    return f"{PREFIX}{{{tenant.name}}}:{kind}"
