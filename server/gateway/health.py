"""Liveness and readiness, from state the gateway already has; neither ever waits in the engine queue.

    (both fail, with the start-up phase, until the model is serving: server.gateway.startup)
    live  = engine alive ∧ not stalled (the engine has unfinished requests and made no step for
            --liveness-stall-seconds since it had them)
    ready = started ∧ not draining ∧ live ∧ generation proven within --readiness-window-seconds:
            a request completed, or (busy) the engine made a step, or (idle only) a one-token probe succeeded

Busy and idle are the engine's own (`Engine.pending_requests`), never the gateway's in-flight requests: a stream
whose client reads slowly, or not at all, is the client's business (render.SSEResponse times it out) and neither
fails a probe nor keeps the engine "busy" once the engine has finished with it.

A probe runs only while the engine is idle, in a task of its own. An idle pod refreshes its proof when half
the window has passed, without waiting for it; only when the proof has run out (at startup, or after a long
silence) does `ready()` wait for a probe, at most PROBE_WAIT_S. So /ready answers within a second at any load.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from server.gateway.admission import Admission
from server.gateway.engine import Engine, SamplingOptions
from server.gateway.startup import Startup

log = logging.getLogger("dsv2.health")

PROBE_WAIT_S = 0.5
PROBE_TIMEOUT_S = 30.0


class Health:
    def __init__(
        self, engine: Engine, admission: Admission, startup: Startup, window: float, stall: float
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.startup = startup
        self.probe_prompt = [0]  # the tokenizer's BOS once it is loaded
        self.window = window
        self.stall = stall
        self._probe: asyncio.Task | None = None
        self._probe_ok_at = 0.0
        self._probe_error: str | None = None

    def live(self) -> tuple[bool, str]:
        if not self.startup.serving:
            return False, self.startup.describe()
        if self.engine.is_dead:
            return False, "engine dead"
        if self._busy():
            progress = self.engine.progress
            if time.monotonic() - max(progress.last_step, progress.busy_since) > self.stall:
                return False, "engine stalled"
        return True, "ok"

    async def ready(self) -> tuple[bool, str]:
        if not self.startup.serving:
            return False, self.startup.describe()
        if self.admission.draining:
            return False, "draining"
        ok, reason = self.live()
        if not ok:
            return False, reason
        if self._proven():
            if not self._busy() and self._age() > self.window / 2:
                self._start_probe()  # refresh the proof ahead of time, without waiting for it
            return True, "ok"
        if self._busy():
            return False, "no engine progress"
        await asyncio.wait({self._start_probe()}, timeout=PROBE_WAIT_S)
        if self._proven():  # the probe succeeded, or requests came in meanwhile and the engine is stepping
            return True, "ok"
        return False, "probe failed" if self._probe_error else "probe pending"

    def _start_probe(self) -> asyncio.Task:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        return self._probe

    def _busy(self) -> bool:
        """The engine has requests it has not finished (however fast their clients read them) besides a probe."""
        probing = self._probe is not None and not self._probe.done()
        return self.engine.pending_requests > int(probing)

    def _age(self) -> float:
        """Seconds since generation was last proven by a completed request or probe."""
        return time.monotonic() - max(self.engine.progress.last_success, self._probe_ok_at)

    def _proven(self) -> bool:
        """Generation proven within the window: a completed request or probe, or (busy) an engine step."""
        if self._age() < self.window:
            return True
        progress = self.engine.progress
        return self._busy() and time.monotonic() - max(progress.last_step, progress.busy_since) < self.window

    async def _run_probe(self) -> None:
        """One greedy token for a one-token prompt; the engine is idle, so it runs at once."""
        probe_id = f"ready-{uuid.uuid4().hex}"
        options = SamplingOptions(max_tokens=1, temperature=0.0, stream=False)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async for _ in self.engine.generate(self.probe_prompt, options, probe_id):
                    pass
        except Exception as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}"
            log.warning("readiness probe failed: %s", self._probe_error)  # the detail goes to logs only
            try:
                await self.engine.abort(probe_id)
            except Exception:
                pass
            return
        self._probe_error = None
        self._probe_ok_at = time.monotonic()
