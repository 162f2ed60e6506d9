"""The batch worker: one task per replica that takes a batch under a lease, runs its lines, and finishes it.

Each line goes through the app itself, in-process (an ASGI call), as its batch's owner: the same middleware,
validation, template, tools, structured outputs, admission and usage as a live request, so a batch line and the
same live request give the same body. The call carries a per-process secret header that the middleware alone
checks (server.gateway.middleware), so no client can pose as a batch; it marks the request as a batch line, which
admission counts against the batch cap (inside the server's budget) and serving runs at --batch-priority.

Lines run at most `admission.batch_cap` at a time (smaller while live requests run: spare capacity). A line
that meets a full budget (429) or a drain (503) waits and is tried again; any other answer is its result,
written with the line's done-mark in one transaction (store.record) before it counts. On a restart (or on
another replica, once the lease lapses) the lines without a row run; the output is built from the rows at the
end, so no custom_id is lost or written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.batch import lines as batch_lines
from server.batch.store import Store, database_url
from server.gateway.admission import Admission
from server.settings import Settings

log = logging.getLogger("dsv2.batch")

INTERNAL_HEADER = "x-dsv2-batch-secret"  # the middleware trusts a call with the process's secret here
OWNER_HEADER = "x-dsv2-batch-owner"  # as the key of this name
EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
RETRY = frozenset({429, 503})  # a full budget or a drain: try the line again later


def batch_dir(settings: Settings) -> Path:
    if settings.batch_dir:
        return Path(settings.batch_dir).expanduser()
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    return hf_home.parent / "dsv2-batches"


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dsv2_batch_requests",
            "Batch lines finished, by status (completed: answered 200; failed: any other answer; expired).",
            ["status"],
            registry=registry,
        )
        self.batches = Gauge(
            "dsv2_batches", "Batches in the store, by status.", ["status"], registry=registry
        )
        self.pending = Gauge(
            "dsv2_batch_lines_pending",
            "Lines of unfinished batches not yet done (all replicas).",
            registry=registry,
        )


class Batches:
    """The Batch API's store and worker, held on app.state.batches."""

    def __init__(self, settings: Settings, registry: CollectorRegistry, secret: str) -> None:
        where = batch_dir(settings)
        if not settings.batch_store:
            where.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.store = Store(database_url(settings.batch_store, where), where / "files")
        self.metrics = BatchMetrics(registry)
        self.secret = secret
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.admission: Admission | None = None
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._current: str | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self.store.migrate)

    def start(self, app, admission: Admission) -> None:
        """Start working batches: the model serves, and `app` answers the lines."""
        self.admission = admission
        transport = httpx.ASGITransport(app=app)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the worker: lines in flight are dropped (they run again later, never twice in the output), and
        the lease is given back so that another replica may take the batch at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._current is not None:
            await asyncio.to_thread(self.store.release, self._current, self.replica)
        if self._client is not None:
            await self._client.aclose()
        self.store.close()

    # --- the loop ----------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        poll = self.settings.batch_poll_seconds
        while True:
            try:
                await self._publish()
                batch = None
                if not self.admission.draining:
                    batch = await asyncio.to_thread(
                        self.store.claim, self.replica, self.settings.batch_lease_seconds
                    )
                if batch is None:
                    await asyncio.sleep(poll)
                    continue
                self._current = batch["id"]
                try:
                    await self._work(batch)
                except FileNotFoundError:  # its input file was deleted before every line had run
                    error = {
                        "code": "input_file_missing",
                        "message": "the input file was deleted",
                        "line": None,
                    }
                    await asyncio.to_thread(
                        self.store.advance, batch["id"], self.replica, "failed", errors=json.dumps([error])
                    )
                finally:
                    await asyncio.to_thread(self.store.release, batch["id"], self.replica)
                    self._current = None
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch worker: unexpected error; going on in %g s", poll)
                await asyncio.sleep(poll)

    async def _publish(self) -> None:
        by_status, pending = await asyncio.to_thread(self.store.status_counts)
        for status in (
            "validating",
            "in_progress",
            "finalizing",
            "cancelling",
            "completed",
            "failed",
            "expired",
            "cancelled",
        ):
            self.metrics.batches.labels(status).set(by_status.get(status, 0))
        self.metrics.pending.set(pending)

    async def _work(self, batch: dict) -> None:
        bid = batch["id"]
        if batch["status"] in ("validating", "in_progress") and time.time() >= batch["expires_at"]:
            await self._expire(batch)
            await self._finish(batch, "expired")
            return
        if batch["status"] == "validating":
            if await asyncio.to_thread(self.store.advance, bid, self.replica, "in_progress"):
                log.info("batch %s: in progress (%d lines)", bid, batch["total"])
            batch = await asyncio.to_thread(self.store.get_batch, None, bid)
        if batch["status"] == "in_progress":
            outcome = await self._run_lines(batch)
            if outcome in ("lost", "drain"):
                return
            batch = await asyncio.to_thread(self.store.get_batch, None, bid)
        if batch["status"] in ("in_progress", "validating") and time.time() >= batch["expires_at"]:
            await self._expire(batch)
            await self._finish(batch, "expired")
        elif batch["status"] == "cancelling":
            await self._finish(batch, "cancelled")
        elif batch["status"] == "in_progress" and batch["completed"] + batch["failed"] >= batch["total"]:
            await asyncio.to_thread(self.store.advance, bid, self.replica, "finalizing")
            await self._finish(batch, "completed")
        elif batch["status"] == "finalizing":
            await self._finish(batch, "completed")

    async def _run_lines(self, batch: dict) -> str:
        """Run the lines not yet done, at most the batch cap at a time, while the lease holds. Returns why it
        stopped: done, cancel, expired, lost (another replica has the lease), drain."""
        bid = batch["id"]
        data = await asyncio.to_thread(self.store.file_path(batch["input_file_id"]).read_bytes)
        todo_all, _ = await asyncio.to_thread(batch_lines.parse, data, batch["endpoint"])
        done = await asyncio.to_thread(self.store.done_lines, bid)
        todo = [line for line in todo_all if line.no not in done]
        running: set[asyncio.Task] = set()
        stop: list[str] = []
        renew = asyncio.ensure_future(self._renew(batch, stop))
        try:
            for line in todo:
                while len(running) >= self.admission.batch_cap and not stop:
                    # the cap shrinks while live requests run: wait for a line to end or the live load to drop
                    if running:
                        _, running = await asyncio.wait(
                            running, timeout=0.1, return_when=asyncio.FIRST_COMPLETED
                        )
                    else:
                        await asyncio.sleep(0.1)
                if stop or self.admission.draining:
                    break
                running.add(asyncio.ensure_future(self._line(batch, line)))
            while running and not stop:
                _, running = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        finally:
            renew.cancel()
            draining = self.admission.draining and not stop
            for task in running:
                if not draining:  # cancelled, expired, lost: drop what still runs (the slot aborts it)
                    task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if self.admission.draining:
            return "drain"
        return stop[0] if stop else "done"

    async def _renew(self, batch: dict, stop: list[str]) -> None:
        while True:
            await asyncio.sleep(self.settings.batch_poll_seconds)
            row = await asyncio.to_thread(
                self.store.renew, batch["id"], self.replica, self.settings.batch_lease_seconds
            )
            if row is None:
                log.warning("batch %s: lease lost to another replica", batch["id"])
                stop.append("lost")
            elif row["status"] == "cancelling":
                stop.append("cancel")
            elif time.time() >= row["expires_at"]:
                stop.append("expired")
            if stop:
                return

    async def _line(self, batch: dict, line: batch_lines.Line) -> None:
        request_id = "batch_req_" + uuid.uuid4().hex
        headers = {INTERNAL_HEADER: self.secret, OWNER_HEADER: batch["owner"], "x-request-id": request_id}
        while True:
            try:
                r = await self._client.post(batch["endpoint"], json=line.body, headers=headers)
            except (
                Exception
            ) as exc:  # the app answers every request; this is a bug, recorded as the line's 500
                log.exception("batch %s: line %d failed", batch["id"], line.no + 1)
                error = {"message": f"internal error: {type(exc).__name__}", "type": "server_error"}
                r = httpx.Response(500, json={"error": {**error, "param": None, "code": None}})
            if self.admission.draining and (r.status_code in RETRY or r.status_code >= 500):
                return  # not done (refused, or aborted by the drain): it runs after the restart
            if r.status_code not in RETRY:
                break
            if self.admission.draining:
                return  # not done: it runs after the restart
            await asyncio.sleep(
                min(5.0, float(r.headers.get("retry-after", "0.2") or 0.2)) if r.status_code == 429 else 1.0
            )
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
        out = {
            "id": request_id,
            "custom_id": line.custom_id,
            "response": {
                "status_code": r.status_code,
                "request_id": r.headers.get("x-request-id", request_id),
                "body": body,
            },
            "error": None,
        }
        ok = r.status_code == 200
        if await self._record(batch["id"], line, ok, out):
            self.metrics.requests.labels("completed" if ok else "failed").inc()

    async def _record(self, batch_id: str, line: batch_lines.Line, ok: bool, out: dict) -> bool:
        """Write a line's result; a cancel (of the batch, or of the worker) waits for a write begun, so that the
        output files, built once the lines have stopped, hold every line counted."""
        write = asyncio.ensure_future(
            asyncio.to_thread(self.store.record, batch_id, line.no, line.custom_id, ok, out)
        )
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            await write
            raise

    async def _expire(self, batch: dict) -> None:
        """The window has passed: every line not done gets a batch_expired error line."""
        data = await asyncio.to_thread(self.store.file_path(batch["input_file_id"]).read_bytes)
        todo, _ = await asyncio.to_thread(batch_lines.parse, data, batch["endpoint"])
        done = await asyncio.to_thread(self.store.done_lines, batch["id"])
        for line in todo:
            if line.no in done:
                continue
            out = {
                "id": "batch_req_" + uuid.uuid4().hex,
                "custom_id": line.custom_id,
                "response": None,
                "error": EXPIRED,
            }
            if await self._record(batch["id"], line, False, out):
                self.metrics.requests.labels("expired").inc()

    async def _finish(self, batch: dict, status: str) -> None:
        """Write the output and error files from the recorded lines, then the final status."""
        ids = await asyncio.to_thread(self._write_results, batch)
        await asyncio.to_thread(self.store.advance, batch["id"], self.replica, status, **ids)
        log.info("batch %s: %s", batch["id"], status)

    def _write_results(self, batch: dict) -> dict:
        ids = {}
        for ok, column, name in ((True, "output_file_id", "output"), (False, "error_file_id", "errors")):
            text = "".join(line + "\n" for line in self.store.result_lines(batch["id"], ok))
            if text:
                row = self.store.add_file(
                    batch["owner"], f"{batch['id']}_{name}.jsonl", "batch_output", text.encode()
                )
                ids[column] = row["id"]
        return ids
