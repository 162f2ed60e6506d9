"""One pure-ASGI middleware for what every request goes through: X-Request-Id, API-key auth on /v1/*,
the body-size limit, refusal while draining, request counting and the access log.

Pure ASGI (not BaseHTTPMiddleware) so streams pass through untouched and client disconnects reach the handler.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gateway.errors import APIError
from server.gateway.metrics import GatewayMetrics, route_label

access_log = logging.getLogger("dsv2.access")


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: list[str],
        max_request_bytes: int,
        metrics: GatewayMetrics,
        is_draining,
    ) -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        status_box = [500]
        rid_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        try:
            error = self._refuse(scope, headers, path)
            if error is not None:
                await error.response()(scope, _no_receive, send_wrapper)
                return
            await self.app(scope, self._limited(receive), send_wrapper)
        finally:
            status = status_box[0]
            self.metrics.requests.labels(route_label(path), scope["method"], str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    '%s "%s %s" %d %.1fms',
                    client[0] if client else "-",
                    scope["method"],
                    path,
                    status,
                    (time.perf_counter() - start) * 1000,
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                        "client": client[0] if client else None,
                    },
                )

    def _refuse(self, scope: Scope, headers: dict[bytes, bytes], path: str) -> APIError | None:
        if not path.startswith("/v1/"):
            return None
        if scope["method"] == "OPTIONS":  # CORS preflight carries no credentials
            return None
        if self.api_keys and not self._authorized(headers.get(b"authorization", b"")):
            return APIError(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if self.is_draining():
            return APIError(
                "the server is shutting down; retry on another replica", 503, code="shutting_down"
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return APIError(
                f"request body of {int(length)} bytes exceeds the limit of {self.max_request_bytes} bytes",
                413,
            )
        return None

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        ok = False
        for key in self.api_keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(token, key)
        return ok and scheme.lower() == b"bearer"

    def _limited(self, receive: Receive) -> Receive:
        """Bodies without (or lying about) Content-Length are counted as they arrive."""
        seen = 0
        limit = self.max_request_bytes

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Starlette's HTTPException passes FastAPI's body parsing untouched; errors.py shapes it.
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        return wrapped


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
