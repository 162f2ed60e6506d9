"""Per-key limits, decided in one flow whatever holds the counts: requests and tokens per minute (token buckets)
and sequences in flight (`max_sequences`) of each API key (tenants.py).

    middleware  refuse_spent   before the body: a 429 for a key whose requests per minute are known spent
    serving     admit          after the prompt is encoded, in one step (one round trip to a store): one of the
                               key's requests per minute, its worst case (prompt + n x max_tokens) of its tokens
                               per minute, and its sequences of max_sequences, all or nothing (429, 400)
                settle_tokens  at its end, however it ended, what it did not use given back
    admission   release_sequences   its sequences, when its slot is released
    middleware  peek           at the response's start: the x-ratelimit-* headers its check did not see, and for a
                               request that ended before its check (a bad body, a model it may not use, a full
                               server), one of the key's requests all the same

Each request keeps the buckets' state as its own checks left it (`Account`, in its scope state): its x-ratelimit-*
headers are those values, whichever process or replica changed the buckets before.

A key's requests per minute only refill with time (nothing gives a request back), so a check that leaves the
bucket under one request tells this process when the next one can fit: until then the middleware refuses the
key's requests before reading their bodies, without asking the store (`refuse_spent`). A key out of requests costs
neither a parse, nor an encoding, nor a round trip.

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
from dataclasses import dataclass, field
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


@dataclass
class Account:
    """One request with its key's limits: the buckets as its latest check left them (its x-ratelimit-* headers),
    and whether its one request per minute was checked (taken, refused, or the store did not answer)."""

    windows: Windows = field(default_factory=dict)
    checked: bool = False


@dataclass(frozen=True)
class Lease:
    """Sequences of one request, counted against its key's max_sequences until released."""

    key: str  # where the counters keep the key's sequences
    cost: int
    member: str = ""  # the lease's id in a store


@dataclass(frozen=True)
class Taken:
    """What a take did: nothing at all when `refused` names what had too little ("requests", "tokens" or
    "sequences"); else the amounts taken and, when sequences were asked for, their `lease`."""

    windows: Windows
    refused: str | None = None
    wait: float = 0.0  # seconds until the refused bucket's amount fits
    lease: Lease | None = None
    held: int = 0  # the key's sequences in flight, the lease's included


@dataclass(frozen=True)
class Admitted:
    """What a request's admission holds of its key's limits: tokens reserved (None: nothing to settle) and its
    sequences' lease (None: nothing to release)."""

    reserved: int | None = None
    lease: Lease | None = None


class StoreUnavailable(Exception):
    """The store of the counts failed (it has counted and logged it); `store` names it, without credentials."""

    def __init__(self, store: str) -> None:
        super().__init__(store)
        self.store = store


class Counters(Protocol):
    """Where the counts live. `take` takes `amounts` (kind -> tokens; 0 only looks; negative gives back, never
    above the capacity) from a key's buckets together: with `fit`, all or nothing, refusing when one has too
    little now. With `sequences` (and `fit`), it also leases that many of the key's max_sequences, in the same
    all-or-nothing step. It may raise StoreUnavailable; `release` never raises."""

    store: str

    async def take(self, tenant: Tenant, amounts: dict[str, int], fit: bool, sequences: int = 0) -> Taken: ...

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


@dataclass(frozen=True)
class _Spent:
    """A key's requests per minute, found under one request: none fits before `until` (monotonic)."""

    per_minute: int
    until: float
    seen: float  # when `window` was read
    window: Window


class RateLimits:
    """The per-key limit checks of every request, over `counters`; `fail_open` says what a request gets when the
    store fails: admitted and not counted (True), or a 503 (False)."""

    def __init__(self, counters: Counters, metrics: GatewayMetrics, fail_open: bool = True) -> None:
        self.counters = counters
        self.metrics = metrics
        self.fail_open = fail_open
        self.spent: dict[str, _Spent] = {}  # key name -> its requests per minute, known spent for a while
        self._settling: set[asyncio.Task] = set()

    async def open(self) -> None:
        await self.counters.open()

    async def close(self) -> None:
        await self.counters.close()

    def refuse_spent(self, tenant: Tenant, account: Account) -> APIError | None:
        """Before a request's body is read: the 429 of a key whose requests per minute an earlier check found
        spent, while no request can fit yet (only time refills the bucket). None: ask the counters."""
        spent = self.spent.get(tenant.name)
        if spent is None:
            return None
        now = time.monotonic()
        # Refilled by now, or the key's limits were reloaded: ask the counters.
        if now >= spent.until or spent.per_minute != tenant.requests_per_minute:
            del self.spent[tenant.name]
            return None
        account.checked = True
        w = spent.window
        account.windows["requests"] = Window(w.limit, 0, max(0.0, w.reset - (now - spent.seen)))
        message = f"rate limit of key {tenant.name!r} reached (requests per minute)"
        return self._limited(tenant, message, spent.until - now, account.windows)

    async def admit(
        self,
        tenant: Tenant,
        account: Account,
        *,
        tokens: int | None = None,
        sequences: int = 0,
        param: str = "max_tokens",
        charged: bool = True,
    ) -> Admitted:
        """A request against every limit of its key in one step (one round trip to a store), all or nothing: one
        of its requests per minute; `tokens`, its worst case (prompt + n x max tokens), reserved from its tokens
        per minute so that no request can spend what the key does not have (`settle_tokens` gives back what it
        did not use); and `sequences` of its max_sequences, leased until `release_sequences`. A 429 names the
        limit that refused and when to retry; a 400 names `param` (the max tokens parameter) when `tokens` is
        more than a minute's allowance, which no wait can make fit. Not `charged` (a batch line without
        --batch-counts-toward-limits): only its sequences count. A failed store that admits holds nothing."""
        amounts: dict[str, int] = {}
        if charged:
            account.checked = True
            if tenant.requests_per_minute is not None:
                amounts["requests"] = 1
            if (limit := tenant.tokens_per_minute) is not None:
                if tokens is not None and tokens > limit:
                    self.metrics.key_rate_limited.labels(tenant.name).inc()
                    raise APIError(
                        f"this request may use up to {tokens} tokens (prompt + n x {param}), more than key "
                        f"{tenant.name!r} may use in a minute ({limit} tokens per minute); lower {param}",
                        param=param,
                        code="rate_limit_exceeded",
                    )
                amounts["tokens"] = tokens or 0  # None: looked at, for the headers
        leased = sequences if tenant.max_sequences is not None else 0
        if not amounts and not leased:
            return Admitted()
        try:
            taken = await self.counters.take(tenant, amounts, fit=True, sequences=leased)
        except StoreUnavailable as exc:
            return self._unavailable(exc) or Admitted()
        account.windows.update(taken.windows)
        self._note(tenant, taken)
        if taken.refused == "sequences":
            self.metrics.rejected.labels("key_limit").inc()
            self.metrics.key_rate_limited.labels(tenant.name).inc()
            raise APIError(
                f"key {tenant.name!r} has {taken.held} of its {tenant.max_sequences} sequences in flight; this "
                f"request needs {sequences}; retry when one ends",
                429,
                code="rate_limit_exceeded",
                headers={"Retry-After": "1", **headers(account.windows)},
            )
        if taken.refused == "tokens":
            limit, left = tenant.tokens_per_minute, taken.windows["tokens"].remaining
            message = (
                f"rate limit of key {tenant.name!r} reached (tokens per minute): {left} of {limit} left, and this "
                f"request may use up to {tokens} (prompt + n x {param})"
            )
            raise self._limited(tenant, message, taken.wait, account.windows)
        if taken.refused:
            message = f"rate limit of key {tenant.name!r} reached (requests per minute)"
            raise self._limited(tenant, message, taken.wait, account.windows)
        return Admitted(amounts.get("tokens") or None, taken.lease)

    async def settle_tokens(self, tenant: Tenant, reserved: int | None, used: int, account: Account) -> None:
        """A request has ended, however it ended: it is charged `used`, and the rest of `reserved` returns. The
        refund runs to its end even when the request's task is cancelled meanwhile (a client gone)."""
        if reserved is None or used == reserved:  # nothing reserved, or nothing to give back
            return
        refund = asyncio.ensure_future(self.counters.take(tenant, {"tokens": used - reserved}, fit=False))
        self._settling.add(refund)
        refund.add_done_callback(_settled)
        refund.add_done_callback(self._settling.discard)
        try:
            account.windows.update((await asyncio.shield(refund)).windows)
        except StoreUnavailable:  # lost: the key was charged its worst case, which refills within the minute
            pass

    async def peek(self, tenant: Tenant, account: Account, metered: bool = False) -> None:
        """At a response's start: the key's buckets this request's checks did not see, into its windows. A
        `metered` request that ended before its check (a bad body, a model the key may not use, a full server)
        is one of the key's requests all the same, taken here when one is left. Nothing if the store fails."""
        amounts = {k: 0 for k in KINDS if capacity(tenant, k) is not None and k not in account.windows}
        if metered and not account.checked and tenant.requests_per_minute is not None:
            account.checked = True
            amounts["requests"] = 1
        if amounts:
            try:
                taken = await self.counters.take(tenant, amounts, fit=True)
            except StoreUnavailable:
                return
            account.windows.update(taken.windows)
            self._note(tenant, taken)

    def release_sequences(self, lease: Lease | None) -> None:
        if lease is not None:
            self.counters.release(lease)

    def _note(self, tenant: Tenant, taken: Taken) -> None:
        """Keep in mind until when the key's requests per minute are spent, when this take found them so."""
        w = taken.windows.get("requests")
        if w is None or w.remaining > 0:
            return
        now = time.monotonic()
        if taken.refused == "requests":
            wait = taken.wait
        else:  # the level under one request, from the seconds until full: level = limit x (1 - reset / 60)
            wait = w.reset - (w.limit - 1) * 60 / w.limit
        if wait > 0:
            self.spent[tenant.name] = _Spent(w.limit, now + wait, now, w)

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

    def _limited(self, tenant: Tenant, message: str, wait: float, windows: Windows) -> APIError:
        self.metrics.key_rate_limited.labels(tenant.name).inc()
        return APIError(
            f"{message}; retry in {math.ceil(wait)} s",
            429,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(wait))), **headers(windows)},
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

    async def take(self, tenant: Tenant, amounts: dict[str, int], fit: bool, sequences: int = 0) -> Taken:
        buckets = {kind: self._bucket(tenant, kind) for kind in amounts}
        refused = next((k for k, n in amounts.items() if fit and n > 0 and buckets[k].wait(n) > 0), None)
        held = self.sequences.get(tenant.name, 0)
        if refused is None and sequences and held + sequences > (tenant.max_sequences or 0):
            refused = "sequences"
        if refused is not None:
            wait = buckets[refused].wait(amounts[refused]) if refused in buckets else 0.0
            return Taken({k: b.window() for k, b in buckets.items()}, refused, wait, held=held)
        for kind, amount in amounts.items():
            if amount:
                buckets[kind].take(amount)
        lease = None
        if sequences:
            held = self.sequences[tenant.name] = held + sequences
            lease = Lease(tenant.name, sequences)
        return Taken({k: b.window() for k, b in buckets.items()}, lease=lease, held=held)

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
