"""Per-key limits, decided in one flow whatever holds the counts: requests and tokens per minute (token buckets)
and sequences in flight (`max_sequences`) of each API key (tenants.py).

    middleware  admit_request      one of the key's requests per minute (429 with the wait when none is left)
    admission   acquire_sequences  the request's sequences among the key's max_sequences (429), released at exit
    serving     reserve_tokens     its worst case (prompt + n x max_tokens) from tokens per minute (400, 429)
                settle_tokens      at its end, however it ended, what it did not use given back
    middleware  peek               the x-ratelimit-* headers of a request that took nothing (GET /v1/models)

Each request keeps the buckets' state as its own checks left it (`Windows`, in its scope state): its x-ratelimit-*
headers are those values, whichever process or replica changed the buckets before.

The counts live in this process (`LocalCounters`: each gateway process counts on its own, so a key's limits
multiply by processes x replicas) or in Redis with --rate-limit-store (ratelimit_store.RedisCounters: one count
for every process and replica). A store that fails reports it (metrics, log) and raises StoreUnavailable; what
the request then gets is decided here, by --rate-limit-failure: `open` admits it uncounted, `closed` refuses it
with 503. Keys without limits never reach the counters.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Protocol

from server.gateway.errors import APIError
from server.gateway.metrics import GatewayMetrics
from server.gateway.tenants import Tenant
from server.settings import Settings

KINDS = ("requests", "tokens")  # the buckets, in the order of their headers
# A store that failed is tried again this many seconds later (ratelimit_store), and a client it refused too.
STORE_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Window:
    """One bucket of a key as a check left it: OpenAI's x-ratelimit-{limit,remaining,reset}-<kind>."""

    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


Windows = dict[str, Window]  # kind ("requests", "tokens") -> as this request's latest check left it


@dataclass(frozen=True)
class Taken:
    """What a take from a key's buckets did: nothing at all when `refused` names a bucket with too little."""

    windows: Windows
    refused: str | None = None
    wait: float = 0.0  # seconds until the refused amount fits


@dataclass(frozen=True)
class Lease:
    """Sequences of one request, counted against its key's max_sequences until released."""

    key: str  # where the counters keep the key's sequences
    cost: int
    member: str = ""  # the lease's id in a store


class StoreUnavailable(Exception):
    """The store of the counts failed (it has counted and logged it); `store` names it, without credentials."""

    def __init__(self, store: str) -> None:
        super().__init__(store)
        self.store = store


class Counters(Protocol):
    """Where the counts live. `take` takes `amounts` (kind -> tokens; 0 only looks; negative gives back, never
    above the capacity) from a key's buckets together: with `fit`, all or nothing, refusing when one has too
    little now. `acquire` leases `cost` sequences, or returns None and what the key holds. Both may raise
    StoreUnavailable; `release` never raises."""

    store: str

    async def take(self, tenant: Tenant, amounts: dict[str, int], fit: bool) -> Taken: ...

    async def acquire(self, tenant: Tenant, cost: int) -> tuple[Lease | None, int]: ...

    def release(self, lease: Lease) -> None: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...


def capacity(tenant: Tenant, kind: str) -> int | None:
    """The key's allowance per minute of `kind`, or None."""
    return tenant.requests_per_minute if kind == "requests" else tenant.tokens_per_minute


def headers(windows: Windows) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers of the buckets in `windows`."""
    out: dict[str, str] = {}
    for kind in KINDS:
        if (w := windows.get(kind)) is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(w.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(w.remaining)
            out[f"x-ratelimit-reset-{kind}"] = f"{w.reset:.3f}s"
    return out


class RateLimits:
    """The per-key limit checks of every request, over `counters`; `fail_open` says what a request gets when the
    store fails: admitted and not counted (True), or a 503 (False)."""

    def __init__(self, counters: Counters, metrics: GatewayMetrics, fail_open: bool = True) -> None:
        self.counters = counters
        self.metrics = metrics
        self.fail_open = fail_open
        self._settling: set[asyncio.Task] = set()

    async def open(self) -> None:
        await self.counters.open()

    async def close(self) -> None:
        await self.counters.close()

    async def admit_request(self, tenant: Tenant, windows: Windows) -> None:
        """One of the key's requests per minute (its tokens looked at in the same check, for the headers), or a
        429 saying so and when to retry."""
        if tenant.requests_per_minute is None:
            return
        amounts = {"requests": 1} | ({"tokens": 0} if tenant.tokens_per_minute else {})
        taken = await self._take(tenant, amounts, windows)
        if taken is not None and taken.refused:
            message = f"rate limit of key {tenant.name!r} reached (requests per minute)"
            raise self._limited(tenant, message, taken, windows)

    async def reserve_tokens(self, tenant: Tenant, worst: int, param: str, windows: Windows) -> int | None:
        """Reserve a request's worst case (prompt + n x max tokens) of the key's tokens per minute, so that no
        request can spend what the key does not have; `settle_tokens` gives back what it did not use. A 429 with
        the wait when the budget has too little left now; a 400 naming `param` (the max tokens parameter) when
        the worst case is more than a minute's allowance, which no wait can make fit. Returns what was reserved:
        None when nothing was (no limit, or a failed store that admits)."""
        limit = tenant.tokens_per_minute
        if limit is None:
            return None
        if worst > limit:
            self.metrics.key_rate_limited.labels(tenant.name).inc()
            raise APIError(
                f"this request may use up to {worst} tokens (prompt + n x {param}), more than key {tenant.name!r} "
                f"may use in a minute ({limit} tokens per minute); lower {param}",
                param=param,
                code="rate_limit_exceeded",
            )
        taken = await self._take(tenant, {"tokens": worst}, windows)
        if taken is None:
            return None
        if taken.refused:
            left = taken.windows["tokens"].remaining
            raise self._limited(
                tenant,
                f"rate limit of key {tenant.name!r} reached (tokens per minute): {left} of {limit} left, and this "
                f"request may use up to {worst} (prompt + n x {param})",
                taken,
                windows,
            )
        return worst

    async def settle_tokens(self, tenant: Tenant, reserved: int | None, used: int, windows: Windows) -> None:
        """A request has ended, however it ended: it is charged `used`, and the rest of `reserved` returns. The
        refund runs to its end even when the request's task is cancelled meanwhile (a client gone)."""
        if reserved is None or used == reserved:  # nothing reserved, or nothing to give back
            return
        refund = asyncio.ensure_future(self.counters.take(tenant, {"tokens": used - reserved}, fit=False))
        self._settling.add(refund)
        refund.add_done_callback(_settled)
        refund.add_done_callback(self._settling.discard)
        try:
            windows.update((await asyncio.shield(refund)).windows)
        except StoreUnavailable:  # lost: the key was charged its worst case, which refills within the minute
            pass

    async def peek(self, tenant: Tenant, windows: Windows) -> None:
        """The key's buckets this request's checks did not see, into `windows` (nothing if the store fails)."""
        amounts = {k: 0 for k in KINDS if capacity(tenant, k) and k not in windows}
        if amounts:
            try:
                windows.update((await self.counters.take(tenant, amounts, fit=False)).windows)
            except StoreUnavailable:
                pass

    async def acquire_sequences(self, tenant: Tenant, cost: int) -> Lease | None:
        """`cost` of the key's max_sequences, or a 429 saying how many it has in flight. None: nothing to release
        (no limit, or a failed store that admits)."""
        if tenant.max_sequences is None:
            return None
        try:
            lease, held = await self.counters.acquire(tenant, cost)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        if lease is None:
            self.metrics.rejected.labels("key_limit").inc()
            self.metrics.key_rate_limited.labels(tenant.name).inc()
            raise APIError(
                f"key {tenant.name!r} has {held} of its {tenant.max_sequences} sequences in flight; this request "
                f"needs {cost}; retry when one ends",
                429,
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        return lease

    def release_sequences(self, lease: Lease | None) -> None:
        if lease is not None:
            self.counters.release(lease)

    async def _take(self, tenant: Tenant, amounts: dict[str, int], windows: Windows) -> Taken | None:
        try:
            taken = await self.counters.take(tenant, amounts, fit=True)
        except StoreUnavailable as exc:
            return self._unavailable(exc)
        windows.update(taken.windows)
        return taken

    def _unavailable(self, exc: StoreUnavailable) -> None:
        """A check the store could not make: admitted uncounted (open), or a 503 that names the store (closed)."""
        if self.fail_open:
            return None
        self.metrics.rejected.labels("rate_limit_store").inc()
        raise APIError(
            f"the rate-limit store ({exc.store}) is unavailable, and this key's limits cannot be checked; retry "
            "shortly",
            503,
            code="rate_limit_store_unavailable",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )

    def _limited(self, tenant: Tenant, message: str, taken: Taken, windows: Windows) -> APIError:
        self.metrics.key_rate_limited.labels(tenant.name).inc()
        return APIError(
            f"{message}; retry in {math.ceil(taken.wait)} s",
            429,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(taken.wait))), **headers(windows)},
        )


def _settled(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a refund that failed was counted and logged by its store


# --- the counts in this process ---------------------------------------------------------------------------------


class Bucket:
    """A token bucket of `per_minute`, full at start: at most a minute's allowance at once, refilled evenly.
    `take` a negative amount to give back (never above the capacity)."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, amount: float = 1.0) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level - amount)

    def window(self) -> Window:
        self._refill()
        reset = (self.capacity - self.level) / self.rate
        return Window(int(self.capacity), max(0, math.floor(self.level)), reset)


class LocalCounters:
    """Each key's buckets and sequences in this process's memory: nothing is shared with other processes."""

    store = "this process"

    def __init__(self) -> None:
        self.buckets: dict[tuple[str, str], Bucket] = {}  # (key name, kind)
        self.sequences: dict[str, int] = {}  # key name -> in flight now

    async def take(self, tenant: Tenant, amounts: dict[str, int], fit: bool) -> Taken:
        buckets = {kind: self._bucket(tenant, kind) for kind in amounts}
        refused = next((k for k, n in amounts.items() if fit and n > 0 and buckets[k].wait(n) > 0), None)
        if refused is not None:
            wait = buckets[refused].wait(amounts[refused])
            return Taken({k: b.window() for k, b in buckets.items()}, refused, wait)
        for kind, amount in amounts.items():
            if amount:
                buckets[kind].take(amount)
        return Taken({k: b.window() for k, b in buckets.items()})

    async def acquire(self, tenant: Tenant, cost: int) -> tuple[Lease | None, int]:
        held = self.sequences.get(tenant.name, 0)
        if tenant.max_sequences is not None and held + cost > tenant.max_sequences:
            return None, held
        self.sequences[tenant.name] = held + cost
        return Lease(tenant.name, cost), held + cost

    def release(self, lease: Lease) -> None:
        left = self.sequences.get(lease.key, 0) - lease.cost
        if left > 0:
            self.sequences[lease.key] = left
        else:
            self.sequences.pop(lease.key, None)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _bucket(self, tenant: Tenant, kind: str) -> Bucket:
        bucket = self.buckets.get((tenant.name, kind))
        if bucket is None:
            bucket = self.buckets[(tenant.name, kind)] = Bucket(capacity(tenant, kind) or 0)
        return bucket


def rate_limits(settings: Settings, metrics: GatewayMetrics) -> RateLimits:
    """The app's limits: counted in this process, or in the Redis of --rate-limit-store."""
    if settings.rate_limit_store is None:
        return RateLimits(LocalCounters(), metrics)
    from server.gateway.ratelimit_store import RedisCounters

    fail_open = settings.rate_limit_failure == "open"
    counters = RedisCounters(settings.rate_limit_store, metrics, settings.rate_limit_lease_seconds, fail_open)
    return RateLimits(counters, metrics, fail_open)
