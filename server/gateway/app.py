"""create_app(settings): the FastAPI app and its lifespan (bring the model up once, behind 503s that name the
start-up phase; drain and stop it at exit); run(settings): serve it with uvicorn, listening from the first second,
and drain gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from server import __version__
from server.batch.routes import router as batch_router
from server.batch.worker import Batches
from server.gateway import connections, paths, playground
from server.gateway.admission import Admission, Counts
from server.gateway.engine import Engine, VLLMEngine
from server.gateway.errors import install_handlers
from server.gateway.health import Health
from server.gateway.logs import configure_logging
from server.gateway.metrics import GatewayMetrics, sample_loop_lag
from server.gateway.middleware import GatewayMiddleware
from server.gateway.ratelimits import rate_limits
from server.gateway.routes import lora_router, router
from server.gateway.serving import Services
from server.gateway.startup import Startup, download, is_local
from server.gateway.template import ChatTemplate
from server.gateway.tenants import Tenants
from server.gateway.tenants import load as load_tenants
from server.gateway.tracing import tracer_from_settings
from server.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger("dsv2.app")

# Addresses only this machine reaches: serving there without keys needs no --allow-unauthenticated.
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def check_settings(settings: Settings) -> Tenants:
    """The tenants, or ValueError for what stops the start before anything starts: a bad key file, no keys on a
    non-loopback --host without --allow-unauthenticated, runtime LoRA loading with several gateway processes."""
    tenants = load_tenants(settings.api_keys, settings.api_key_file)
    if not tenants.enabled and settings.host not in LOOPBACK and not settings.allow_unauthenticated:
        raise ValueError(
            f"no API keys, and --host {settings.host} is not loopback: give keys (--api-keys, "
            "--api-key-file) or serve without them on purpose with --allow-unauthenticated"
        )
    if settings.allow_runtime_lora_updating and settings.api_server_count > 1:
        raise ValueError(
            f"--allow-runtime-lora-updating cannot be used with --api-server-count {settings.api_server_count}: "
            "an adapter loaded through one gateway process would be unknown to the others (vLLM refuses "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING with api_server_count > 1 likewise); serve adapters from the start "
            "with --lora-modules, or use one process"
        )
    return tenants


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    tracer: Tracer | None = None,
    wait_for_model: bool = True,
    counts: Counts | None = None,
    model_path: str | None = None,
) -> FastAPI:
    """The app; `engine` defaults to a vLLM AsyncLLM built in the lifespan (tests may pass a FakeEngine), `tracer`
    to the OTLP exporter of --otlp-traces-endpoint (none: tracing off). With `wait_for_model` the lifespan's
    start-up returns once the model serves (and raises if it cannot); without it, at once, the model coming up
    behind 503s (server.gateway.startup) and `app.state.stop_server()` called if it fails. `counts`: the
    admission budget's counts shared with the other gateway processes of the engine (server.gateway.processes),
    `model_path`: where a repo id --model was already downloaded. ValueError as check_settings says, before
    anything starts."""
    metrics = GatewayMetrics()
    metrics.inflight_limit.set(settings.max_inflight_sequences)
    tenants = check_settings(settings)
    tracer = tracer if tracer is not None else tracer_from_settings(settings.otlp_traces_endpoint)
    # The batch worker's calls into this app carry this secret (the middleware checks it); it never leaves.
    batch_secret = secrets.token_hex(32)
    batches = Batches(settings, metrics.registry, batch_secret)
    ratelimits = rate_limits(settings, metrics)  # the keys' counts: this process's, or --rate-limit-store's

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lag = asyncio.get_running_loop().create_task(sample_loop_lag(metrics.loop_lag))
        try:
            async with _serving(app):
                yield
        finally:
            lag.cancel()

    @asynccontextmanager
    async def _serving(app: FastAPI) -> AsyncIterator[None]:
        startup = Startup(metrics, "loading_weights" if is_local(settings.model) else "downloading")
        eng = engine if engine is not None else VLLMEngine(settings)
        admission = Admission(
            eng,
            metrics,
            settings.max_inflight_sequences,
            settings.batch_max_sequences,
            settings.batch_busy_max_sequences,
            counts,
            ratelimits=ratelimits,
        )
        await batches.open()  # the batch store's migrations: a database that cannot open stops the start
        await ratelimits.open()  # renews leases; a store that does not answer yet does not stop the start
        health = Health(
            eng,
            admission,
            startup,
            window=settings.readiness_window_seconds,
            stall=settings.liveness_stall_seconds,
        )
        app.state.admission = admission
        app.state.health = health
        app.state.startup = startup
        bring_up = asyncio.ensure_future(_bring_up(app, eng, startup, health, admission))
        if wait_for_model:
            await bring_up
        else:
            bring_up.add_done_callback(lambda task: _start_failed(app, task))
        try:
            yield
        finally:
            bring_up.cancel()
            await batches.stop()  # lines in flight run again later; the lease is given back
            if startup.serving and not admission.idle:
                await admission.drain(0)
            await eng.shutdown()
            await ratelimits.close()
            log.info("engine stopped")

    async def _bring_up(
        app: FastAPI, eng: Engine, startup: Startup, health: Health, admission: Admission
    ) -> None:
        """Download a repo id, load the tokenizer, start the engine and its adapters; then serve."""
        model = model_path or settings.model
        if not is_local(model):
            model = await asyncio.to_thread(
                download, settings.model, settings.revision, settings.download_dir, startup
            )
        if model != settings.model:
            eng.use_download(model)
        startup.enter("loading_weights")
        template = await asyncio.to_thread(
            ChatTemplate, settings.tokenizer or model, settings.trust_remote_code
        )
        health.probe_prompt = [template.bos_id if template.bos_id is not None else 0]
        await eng.start(startup)
        try:  # a bad --lora-modules adapter stops the start-up with its name, not its first request
            for name, path in settings.adapters.items():
                await eng.load_adapter(name, path)
        except BaseException:
            await eng.shutdown()
            raise
        app.state.services = Services(
            settings,
            eng,
            template,
            admission,
            metrics,
            settings.model_name,
            int(time.time()),
            tenants,
            tracer,
            ratelimits,
        )
        if not eng.priority_scheduling and any(t.priority for t in tenants.tenants):
            log.warning("API keys have default priorities, but the engine schedules first come, first served: "
                        "start with --scheduling-policy priority for them to apply")  # fmt: skip
        if not eng.priority_scheduling:
            admission.batch_budget = min(admission.batch_budget, settings.batch_fifo_max_sequences)
            admission.batch_busy_budget = min(admission.batch_busy_budget, admission.batch_budget)
            log.warning("the engine schedules first come, first served: batch lines cannot yield to live requests, "
                        "so at most %d of their sequences run at once (--batch-fifo-max-sequences); start with "
                        "--scheduling-policy priority to run them at --batch-priority", admission.batch_budget)  # fmt: skip
        startup.enter("serving")
        batches.start(app, admission)
        log.info("serving %s on http://%s:%d", settings.model_name, settings.host, settings.port)

    app = FastAPI(
        title="dsv2-serve",
        version=__version__,
        description="DeepSeek-V2 behind the OpenAI API. Errors are always "
        '`{"error": {"message", "type", "param", "code"}}`.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.stop_server = lambda: None
    app.state.batches = batches
    install_handlers(app)
    app.include_router(router)
    app.include_router(batch_router)
    if settings.allow_runtime_lora_updating:
        app.include_router(lora_router)
    if settings.playground:
        app.include_router(playground.router)
    app.add_middleware(
        GatewayMiddleware,
        tenants=tenants,
        max_request_bytes=settings.max_request_bytes,
        metrics=metrics,
        body_timeout=settings.body_timeout,
        upload_paths=frozenset({paths.FILES}),
        max_upload_bytes=settings.batch_max_file_bytes,
        batch_secret=batch_secret,
        batch_counts=settings.batch_counts_toward_limits,
        ratelimits=ratelimits,
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=settings.cors_methods,
            allow_headers=settings.cors_headers,
            expose_headers=[
                "X-Request-Id",
                "Retry-After",
                *(
                    f"x-ratelimit-{w}-{k}"
                    for w in ("limit", "remaining", "reset")
                    for k in ("requests", "tokens")
                ),
            ],
            max_age=600,
        )
    return app


def _start_failed(app: FastAPI, task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    app.state.startup.error = f"{type(exc).__name__}: {exc}"
    log.error(
        "start-up failed in phase %s: %s", app.state.startup.phase, app.state.startup.error, exc_info=exc
    )
    app.state.stop_server()


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean exit, 1 if startup failed. With --api-server-count above 1, the
    engine core and the gateway processes of server.gateway.processes."""
    configure_logging(settings.log_level, settings.log_format)
    if settings.api_server_count > 1:
        from server.gateway import processes

        return processes.run(settings)
    try:
        engine = VLLMEngine(settings)
    except SystemExit as exc:  # vLLM's parser rejected a pass-through engine flag (it printed why)
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError as exc:  # engine flags that contradict ours (e.g. --max-lora-rank below an adapter's)
        log.error("%s", exc)
        return 2
    try:
        app = create_app(settings, engine, wait_for_model=False)
    except ValueError as exc:  # a bad key file, or no keys off loopback: say what is wrong, start nothing
        log.error("%s", exc)
        return 2
    server = DrainingServer(connections.config(app, settings), app, settings.drain_timeout)
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    failed = not server.started or getattr(app.state, "startup", None) is None or app.state.startup.error
    return 1 if failed else 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (readiness fails, new requests get 503, in-flight requests
    finish up to the drain timeout, the rest are aborted) before the normal shutdown; a second signal exits now."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self.fastapi_app = app
        self.drain_timeout = drain_timeout
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._signalled:
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._signalled = True
        if not self.started or self._loop is None:
            return super().handle_exit(sig, frame)
        log.info("%s: draining (up to %.0f s)", signal.Signals(sig).name, self.drain_timeout)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = asyncio.ensure_future(self._drain())
        self._tasks.add(task)

    async def _drain(self) -> None:
        try:
            await self.fastapi_app.state.admission.drain(self.drain_timeout)
        finally:
            self.should_exit = True
