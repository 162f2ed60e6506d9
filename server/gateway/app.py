"""create_app(settings): the FastAPI app and its lifespan (build the engine once, stop it at exit);
run(settings): serve it with uvicorn and drain gracefully on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from server import __version__
from server.gateway.engine import Engine, VLLMEngine
from server.gateway.errors import install_handlers
from server.gateway.logs import configure_logging
from server.gateway.metrics import GatewayMetrics
from server.gateway.middleware import GatewayMiddleware
from server.gateway.routes import router
from server.gateway.serving import Gateway
from server.gateway.template import ChatTemplate
from server.settings import Settings

log = logging.getLogger("dsv2.app")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app; `engine` defaults to a vLLM AsyncLLM built in the lifespan (tests may pass a FakeEngine)."""
    metrics = GatewayMetrics()
    gateway = Gateway(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.template = ChatTemplate(settings.tokenizer or settings.model, settings.trust_remote_code)
        gateway.engine = engine if engine is not None else VLLMEngine(settings)
        await gateway.engine.start()
        log.info("serving %s on http://%s:%d", gateway.model_name, settings.host, settings.port)
        try:
            yield
        finally:
            if gateway.flights:
                await gateway.drain(0)
            await gateway.engine.shutdown()
            log.info("engine stopped")

    app = FastAPI(
        title="dsv2-serve",
        version=__version__,
        description="DeepSeek-V2 behind the OpenAI API. Errors are always "
        '`{"error": {"message", "type", "param", "code"}}`.',
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.settings = settings
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(
        GatewayMiddleware,
        api_keys=settings.api_keys,
        max_request_bytes=settings.max_request_bytes,
        metrics=metrics,
        is_draining=lambda: gateway.draining,
    )
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    return app


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean exit, 1 if startup failed."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        engine = VLLMEngine(settings)
    except SystemExit as exc:  # vLLM's parser rejected a pass-through engine flag (it printed why)
        return exc.code if isinstance(exc.code, int) else 2
    app = create_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = DrainingServer(config, app.state.gateway, settings.drain_timeout)
    server.run()
    return 0 if server.started else 1


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains (readiness fails, new requests get 503, in-flight requests
    finish up to the drain timeout, the rest are aborted) before the normal shutdown; a second signal exits now."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_timeout: float) -> None:
        super().__init__(config)
        self.gateway = gateway
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
        self.gateway.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = asyncio.ensure_future(self._drain())
        self._tasks.add(task)

    async def _drain(self) -> None:
        try:
            await self.gateway.drain(self.drain_timeout)
        finally:
            self.should_exit = True
