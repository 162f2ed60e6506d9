"""Admission: one `async with` slot per generation request. The only owner of the in-flight budget (counted in
sequences, the engine's real unit of work), of the drain state, and of aborting engine requests left behind.
A slot also holds the request's sequences among its key's max_sequences (leased by the key's check in serving,
ratelimits.py), given back at exit.

    async with admission.slot(cost=prompts * n, request_id=...) as slot:   # 503 draining, 429 over budget
        stream = Stream(generate_many(engine, ..., slot.engine_ids), ..., slot)  # tells the slot what finished
        ...
    # on exit: every engine request not finished is aborted (client gone, error), the budget is returned

A stream outlives its handler: serving hands the slot to the response with AsyncExitStack.pop_all(), and the
response exits it once the stream is rendered, however it ends: the budget counts engine work, not bytes waiting
for a client (render.SSEResponse).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.gateway.engine import Engine
from server.gateway.errors import APIError, ClientGone, DeadlineExceeded, engine_unavailable, shutting_down
from server.gateway.metrics import GatewayMetrics
from server.gateway.ratelimits import Lease, LocalCounters, RateLimits
from server.gateway.tenants import ANONYMOUS, Tenant

log = logging.getLogger("dsv2.admission")


class SlowClient(Exception):
    """A stream's client took no data for --stream-send-timeout seconds (render.SSEResponse): what the engine
    still runs for it is aborted, and its slot released."""


class Slot:
    """One admitted request: its id, its cost, and its engine requests still running."""

    __slots__ = ("request_id", "cost", "engine_ids", "pending", "failed", "tenant", "batch", "lease")

    def __init__(
        self, request_id: str, cost: int, engine_ids: list[str], tenant: Tenant, batch: bool = False
    ) -> None:
        self.request_id = request_id
        self.batch = batch  # a batch line: counted in the batch cap too
        self.cost = cost
        self.engine_ids = engine_ids
        self.pending = set(engine_ids)
        self.tenant = tenant
        self.lease: Lease | None = None  # its sequences among its key's max_sequences
        # Why the engine side failed (the stream reports it); what is left is aborted with this reason.
        self.failed: str | None = None

    def finished(self, engine_request: int) -> None:
        """The engine finished its `engine_request`-th request (the stream loop saw its last step)."""
        self.pending.discard(self.engine_ids[engine_request])

    def fail(self, exc: BaseException) -> None:
        """The engine side failed (the stream loop caught it): what is left is aborted with this reason."""
        self.failed = "deadline" if isinstance(exc, DeadlineExceeded) else "error"


class Counts:
    """The sequences in flight, live and batch, that the budget is spent on. With one gateway process, its own;
    with several in front of one engine (--api-server-count), one row per process in shared memory under one
    lock, so that the budget is the engine's and not each process's. Made before the processes start; each one
    sets `index` to its row."""

    def __init__(self, processes: int = 1) -> None:
        self.rows: list[int] | ctypes.Array
        if processes == 1:
            self.rows, self.lock = [0, 0], contextlib.nullcontext()
        else:
            context = multiprocessing.get_context("spawn")
            self.rows, self.lock = context.RawArray("q", 2 * processes), context.Lock()
        self.index = 0

    def totals(self) -> tuple[int, int]:
        """Every process's sequences in flight, and of them those of batch lines."""
        return sum(self.rows[0::2]), sum(self.rows[1::2])

    def own(self) -> int:
        return self.rows[2 * self.index]

    def add(self, cost: int, batch: bool) -> None:
        self.rows[2 * self.index] += cost
        self.rows[2 * self.index + 1] += cost if batch else 0


class Admission:
    def __init__(
        self,
        engine: Engine,
        metrics: GatewayMetrics,
        max_inflight_sequences: int,
        batch_budget: int | None = None,
        batch_busy_budget: int | None = None,
        counts: Counts | None = None,
        ratelimits: RateLimits | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.ratelimits = ratelimits or RateLimits(LocalCounters(), metrics)  # the keys' max_sequences
        self.budget = max_inflight_sequences
        self.counts = counts or Counts()
        # Batch lines' share of the budget: at most `batch_budget` of `sequences` while no live request runs,
        # `batch_busy_budget` while one does (one line over the cap runs alone).
        self.batch_budget = min(batch_budget or max_inflight_sequences, max_inflight_sequences)
        self.batch_busy_budget = self.batch_budget if batch_busy_budget is None else batch_busy_budget
        self.slots: dict[str, Slot] = {}
        self.engine_ids: set[str] = set()  # the engine request ids of every slot in `slots`
        self.draining = False
        self._aborts: set[asyncio.Task] = set()

    @property
    def idle(self) -> bool:
        return not self.slots

    @property
    def sequences(self) -> int:
        """Sequences in flight in front of the engine (every gateway process's)."""
        return self.counts.totals()[0]

    @property
    def batch_sequences(self) -> int:
        return self.counts.totals()[1]

    @property
    def batch_cap(self) -> int:
        """The batch sequences allowed in flight now: spare capacity, the full batch cap while no live request
        runs, the busy cap while any does."""
        live = self.sequences - self.batch_sequences
        return self.batch_budget if live == 0 else min(self.batch_budget, self.batch_busy_budget)

    @asynccontextmanager
    async def slot(
        self,
        cost: int,
        request_id: str,
        engine_requests: int = 1,
        tenant: Tenant = ANONYMOUS,
        batch: bool = False,
    ) -> AsyncIterator[Slot]:
        slot = await self._admit(cost, request_id, engine_requests, tenant, batch)
        # A normal exit with engine requests pending: the stream was not read out.
        reason = "client_disconnected"
        try:
            yield slot
        except SlowClient:
            reason = "slow_client"
            raise
        except (ClientGone, asyncio.CancelledError):
            raise
        except BaseException:  # a deadline arrives as the 504 it became; the stream loop recorded its reason
            reason = "error"
            raise
        finally:
            self._release(slot, slot.failed or reason)

    def begin_drain(self) -> None:
        self.draining = True

    async def drain(self, timeout: float) -> None:
        """Stop admitting, wait for in-flight requests up to `timeout`, then abort the rest."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        if self.slots:
            log.info("draining: %d request(s) in flight, up to %.0f s", len(self.slots), timeout)
        while self.slots and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.slots:
            log.warning("drain timeout: aborting %d request(s)", len(self.slots))
            for slot in list(self.slots.values()):
                await self._abort(slot, "drain_timeout")
            end = time.monotonic() + 5.0
            while self.slots and time.monotonic() < end:
                await asyncio.sleep(0.05)
        log.info("drained")

    # --- internals -------------------------------------------------------------------------------------------

    async def _admit(
        self, cost: int, request_id: str, engine_requests: int, tenant: Tenant, batch: bool
    ) -> Slot:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise shutting_down()
        if self.engine.is_dead:
            self.metrics.rejected.labels("engine_unavailable").inc()
            raise engine_unavailable()
        with self.counts.lock:  # the check and the count as one step, across processes
            self._check_budget(cost, batch)
            self.counts.add(cost, batch)
        engine_ids = _engine_ids(request_id, engine_requests)
        # vLLM aborts every request that shares an external id: no two in flight may share one, whatever the
        # client sends (an X-Request-Id reused, or one that equals another request's "<id>-<i>").
        while request_id in self.slots or not self.engine_ids.isdisjoint(engine_ids):
            request_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
            engine_ids = _engine_ids(request_id, engine_requests)
        slot = Slot(request_id, cost, engine_ids, tenant, batch)
        self.engine_ids.update(engine_ids)
        self.slots[request_id] = slot
        self._publish()
        return slot

    def _check_budget(self, cost: int, batch: bool) -> None:
        sequences, batch_sequences = self.counts.totals()
        if sequences + cost > self.budget:
            self.metrics.rejected.labels("overloaded").inc()
            raise APIError(
                f"the server is at capacity ({sequences} of {self.budget} sequences in flight; this request "
                f"needs {cost}); retry shortly",
                429,
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        # One line over a cap of 1 or more runs alone; a cap of 0 (live requests in flight) starts none.
        cap = self.batch_cap
        if batch and batch_sequences + cost > cap and (batch_sequences or not cap):
            self.metrics.rejected.labels("batch_cap").inc()
            raise APIError(
                f"{batch_sequences} of the {cap} sequences batch lines may use now are in flight",
                429,
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )

    def _release(self, slot: Slot, reason: str) -> None:
        if self.slots.pop(slot.request_id, None) is None:
            return
        with self.counts.lock:
            self.counts.add(-slot.cost, slot.batch)
        self.ratelimits.release_sequences(slot.lease)
        self._publish()
        if not slot.pending:
            self.engine_ids.difference_update(slot.engine_ids)
            return
        # A task of its own: the abort must not be lost with the cancellation of the request that asked for it.
        # The ids stay taken until it is sent, so that it cannot abort a new request given one of them.
        task = asyncio.get_running_loop().create_task(self._abort(slot, reason))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        task.add_done_callback(lambda _: self.engine_ids.difference_update(slot.engine_ids))

    async def _abort(self, slot: Slot, reason: str) -> None:
        pending, slot.pending = list(slot.pending), set()
        if not pending:
            return
        self.metrics.aborted.labels(reason).inc()
        log.info("aborting %s (%s)", slot.request_id, reason, extra={"request_id": slot.request_id})
        for engine_id in pending:
            try:
                await self.engine.abort(engine_id)
            except Exception:
                log.exception("abort of %s failed", engine_id, extra={"request_id": slot.request_id})

    def _publish(self) -> None:
        self.metrics.in_flight.set(len(self.slots))
        self.metrics.sequences_in_flight.set(self.counts.own())  # summed over processes on /metrics


def _engine_ids(request_id: str, engine_requests: int) -> list[str]:
    return [request_id] if engine_requests == 1 else [f"{request_id}-{i}" for i in range(engine_requests)]
