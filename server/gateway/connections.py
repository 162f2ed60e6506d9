"""How connections are served: uvicorn's config, and its HTTP protocol (httptools, picked explicitly) with the
limits uvicorn lacks, so that no client holds a connection, or the server's capacity, by going slow:

- **headers**: a request whose headers are not all in within --header-timeout seconds of its first byte gets a
  408 and its connection is closed (slowloris); one whose request line and headers pass MAX_HEADER_BYTES gets a
  431 and is closed (they are held in memory until they are complete); a connection that never starts a request is idle, and closed
  after --timeout-keep-alive like one between requests;
- **connections**: beyond --max-connections (uvicorn's limit_concurrency) requests get a 503, except the probes
  and /metrics, which the kubelet and Prometheus must get answers from at any load;
- **sends**: a connection whose client has taken no data for --stream-send-timeout seconds after its response
  was written is dropped. A stream times its own sends (render.SSEResponse: it must abort the engine and free
  its slot too) and drops its connection through the DROP_CONNECTION extension; the WRITABLE extension tells it
  when a send would be taken at once, and WRITE writes an event then without the ASGI send.

The body read timeout is the app's (middleware.py): only the app knows when it reads a body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from server.gateway import paths
from server.gateway.errors import APIError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from server.settings import Settings

log = logging.getLogger("dsv2.connections")

# scope["extensions"][DROP_CONNECTION](): close the request's connection now, dropping what was not sent.
DROP_CONNECTION = "dsv2.drop_connection"
# scope["extensions"][WRITABLE](): whether the connection takes data now (its transport is not holding writes back
# for a client that does not read), so that a send completes without waiting (render.SSEResponse sends from its
# rendering task then).
WRITABLE = "dsv2.writable"
# scope["extensions"][WRITE](body) -> bool: write `body` as the next piece of the request's streamed (chunked)
# response now, straight to the transport, if its headers went out and the connection takes data, and say True;
# else write nothing and say False (it goes through the ASGI send then). The ASGI send wrappers it passes by (the
# middleware's, Starlette's error handling, CORS) act only on http.response.start: a streamed event saves their
# calls and uvicorn's message (render.SSEResponse writes its events so while the client keeps up).
WRITE = "dsv2.write"
# Answered beyond --max-connections too.
UNCAPPED = frozenset({paths.HEALTH, paths.READY, paths.METRICS})

_HEADER_ERROR_RESPONSE = (
    b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
)
# A request line and headers larger than this are refused (431); browsers and proxies send a few KiB.
MAX_HEADER_BYTES = 64 * 1024


def config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """uvicorn's config for the gateway: its address, keep-alive and the limits above."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.max_connections,
        http=protocol(settings.header_timeout, settings.stream_send_timeout),
    )


def protocol(header_timeout: float, send_timeout: float) -> type[GatewayProtocol]:
    """GatewayProtocol with these timeouts (uvicorn makes one protocol per connection from the class)."""
    timeouts = {"header_timeout": header_timeout, "send_timeout": send_timeout}
    return type("GatewayProtocol", (GatewayProtocol,), timeouts)


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a connection cap that spares UNCAPPED, and a send
    timeout; see the module's docstring."""

    header_timeout = 30.0
    send_timeout = 30.0

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict, _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn applies limit_concurrency before the app, to every path; _capped applies it instead.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._capped
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._send_timer: asyncio.TimerHandle | None = None

    # --- idle and header timeouts ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Until its first byte the connection is idle: uvicorn's keep-alive timer closes it, as between requests.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DROP_CONNECTION: self._drop, WRITABLE: self._writable}
        _cancel(self._header_timer)
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            log.warning(
                "%s: request headers over %d bytes; closing the connection",
                _peer(self.client),
                MAX_HEADER_BYTES,
            )
            self._header_timer = _cancel(self._header_timer)
            self._refuse(
                431,
                b"Request Header Fields Too Large",
                f"request headers exceed {MAX_HEADER_BYTES} bytes",
                "request_headers_too_large",
            )

    def on_headers_complete(self) -> None:
        self._header_timer = _cancel(self._header_timer)
        super().on_headers_complete()
        cycle = self.cycle  # this request's (a pipelined one's, queued behind the response in progress)
        if cycle is not None and cycle.scope is self.scope:
            self.scope["extensions"][WRITE] = partial(self._write, cycle)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        log.warning(
            "%s: request headers not complete within %g s (--header-timeout); closing the connection",
            _peer(self.client),
            self.header_timeout,
        )
        message = f"request headers not received within {self.header_timeout:g} s"
        self._refuse(408, b"Request Timeout", message, "request_timeout")

    def _refuse(self, status: int, reason: bytes, message: str, code: str) -> None:
        """Answer a request that never reached the app with an OpenAI-shaped error, and close the connection."""
        if self.cycle is None or self.cycle.response_complete:  # not in the middle of an earlier response
            body = APIError(message, status, code=code).body()
            payload = json.dumps(body, separators=(",", ":")).encode()
            self.transport.write(_HEADER_ERROR_RESPONSE % (status, reason, len(payload), payload))
        self.transport.close()

    # --- connection cap -----------------------------------------------------------------------------------------

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, or a 503 beyond max_connections open connections (or requests in progress) for any path but
        UNCAPPED. This connection and this request are among those counted."""
        cap, state = self.max_connections, self.server_state
        over = cap is not None and (len(state.connections) > cap or len(state.tasks) > cap)
        if over and scope["path"] not in UNCAPPED:
            log.warning("over --max-connections (%d): %s %s refused", cap, scope["method"], scope["path"])
            error = APIError(
                f"the server has too many open connections (--max-connections {cap}); retry shortly",
                503,
                code="too_many_connections",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await error.response(scope["path"])(scope, receive, send)
            return
        await self._app(scope, receive, send)

    # --- send timeout -------------------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: the client is not taking data."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_timer = _cancel(self._send_timer)

    def _send_timed_out(self) -> None:
        self._send_timer = None
        cycle = self.cycle
        streaming = cycle is not None and cycle.response_started and not cycle.response_complete
        if streaming and not self.transport.is_closing():  # a stream still sending times its sends itself
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out)
            return
        log.warning(
            "%s: the client took no data for %g s (--stream-send-timeout); dropping the connection",
            _peer(self.client),
            self.send_timeout,
        )
        self._drop()

    def _writable(self) -> bool:
        return not self.flow.write_paused  # uvicorn's send waits only while writing is paused (flow control)

    def _write(self, cycle: RequestResponseCycle, body: bytes) -> bool:
        """WRITE: what uvicorn's send does with a chunked response's `http.response.body` message that has more
        to come, when that send would not wait (writing not paused) and the client is still there."""
        if (
            self.flow.write_paused
            or cycle.disconnected
            or not cycle.response_started
            or cycle.response_complete
            or not cycle.chunked_encoding  # a Content-Length body, or a HEAD request's: uvicorn's send checks them
        ):
            return False
        if body:
            self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    def _drop(self) -> None:
        """Close the connection now, with whatever it could not send (close() would wait for the client)."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer = _cancel(self._header_timer)
        self._send_timer = _cancel(self._send_timer)
        super().connection_lost(exc)


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"
