"""One pure-ASGI middleware for what every request goes through, and only that: its request id, API-key auth
on /v1/* (the key's tenant, its request rate and x-ratelimit-* headers: ratelimits.py), the body's size limit
and read timeout,
the access log, and a 500 (with the request id) for anything unexpected.

Pure ASGI (not BaseHTTPMiddleware) so streams pass through untouched and client disconnects reach the handler.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.gateway import paths
from server.gateway.errors import APIError, internal_error
from server.gateway.logs import request_id_var
from server.gateway.metrics import GatewayMetrics
from server.gateway.ratelimits import Account, LocalCounters, RateLimits
from server.gateway.ratelimits import headers as ratelimit_headers
from server.gateway.tenants import ANONYMOUS, Tenant, Tenants

log = logging.getLogger("dsv2.errors")
access_log = logging.getLogger("dsv2.access")

MAX_REQUEST_ID = 64
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")


def sanitize_request_id(raw: bytes | None) -> str | None:
    """A client's X-Request-Id, safe for logs, headers and engine ids: [A-Za-z0-9._:-], at most 64 characters;
    None when nothing usable is left (a fresh id is generated then)."""
    if not raw:
        return None
    cleaned = _UNSAFE_ID_CHARS.sub("", raw.decode("latin-1"))[:MAX_REQUEST_ID]
    return cleaned or None


# Requests that generate: each counts against its key's request rate.


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        tenants: Tenants,
        max_request_bytes: int,
        metrics: GatewayMetrics,
        body_timeout: float = 60.0,
        upload_paths: frozenset[str] = frozenset(),
        max_upload_bytes: int = 0,
        batch_secret: str | None = None,
        batch_counts: bool = False,
        ratelimits: RateLimits | None = None,
    ) -> None:
        self.app = app
        self.ratelimits = ratelimits or RateLimits(LocalCounters(), metrics)
        # Uploads (POST /v1/files) have a limit of their own; batch lines come from the batch worker in this
        # process, with its secret and their owner's name (server.batch.worker), and count against the key's
        # request rate only with --batch-counts-toward-limits.
        self.upload_paths = upload_paths
        self.max_upload_bytes = max_upload_bytes
        self.batch_secret = batch_secret.encode() if batch_secret else None
        self.batch_counts = batch_counts
        self.tenants = tenants
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = sanitize_request_id(headers.get(b"x-request-id")) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        token = request_id_var.set(request_id)
        path: str = scope["path"]
        status_box = [0]
        rid_header = (b"x-request-id", request_id.encode())
        tenant = ANONYMOUS if not self.tenants.enabled else self.tenants.authenticate(_offered_key(headers))
        batch_owner = self._batch_owner(headers)
        if batch_owner is not None:
            tenant = batch_owner
        state["batch"] = batch_owner is not None
        state["tenant"] = tenant or ANONYMOUS
        # The request with its key's limits, as its checks leave it (ratelimits.py): its x-ratelimit-* headers.
        account: Account = state.setdefault("ratelimits", Account())
        counted = batch_owner is None or self.batch_counts  # batch lines read no headers
        limited = tenant is not None and path.startswith("/v1/") and tenant.rate_limited and counted
        # One of the key's requests per minute: taken by the handler's one check of all its limits, or, if the
        # request ends before that, at the response's start (peek).
        metered = limited and scope["method"] == "POST" and path in paths.RATE_LIMITED

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                extra = [rid_header]
                # A 429 carries its own, from the refusal; a 503 (a store that failed, a drain) none.
                if limited and status_box[0] not in (429, 503):
                    await self.ratelimits.peek(tenant, account, metered)  # what no check of this request saw
                    extra += [(k.encode(), v.encode()) for k, v in ratelimit_headers(account.windows).items()]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            error = self._refuse(headers, path, scope["method"], tenant, account if metered else None)
            if error is not None:
                await error.response(path)(scope, _no_receive, send_with_id)
            else:
                await self.app(scope, self._limited(receive, self._limit(path)), send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if status_box[0] == 0:  # nothing sent yet: an OpenAI-shaped 500 that names the request
                await internal_error().response(path)(scope, _no_receive, send_with_id)
        finally:
            request_id_var.reset(token)
            self._record(scope, path, status_box[0] or 500, start, request_id, state["tenant"])

    def _batch_owner(self, headers: dict[bytes, bytes]) -> Tenant | None:
        """The owner of a batch line, when the call carries this process's batch secret; else None."""
        offered = headers.get(b"x-dsv2-batch-secret")
        if (
            self.batch_secret is None
            or offered is None
            or not hmac.compare_digest(offered, self.batch_secret)
        ):
            return None
        name = headers.get(b"x-dsv2-batch-owner", b"").decode("latin-1")
        return self.tenants.named(name) or ANONYMOUS

    def _refuse(
        self,
        headers: dict[bytes, bytes],
        path: str,
        method: str,
        tenant: Tenant | None,
        metered: Account | None,
    ) -> APIError | None:
        if not path.startswith("/v1/") or method == "OPTIONS":  # probes, metrics; CORS preflight has no key
            return None
        if tenant is None:
            return APIError(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>').",
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if metered is not None and (spent := self.ratelimits.refuse_spent(tenant, metered)) is not None:
            return spent  # the key has no request left: refused before its body is read
        length = headers.get(b"content-length")
        limit = self._limit(path)
        if length is not None and length.isdigit() and int(length) > limit:
            return APIError(f"request body of {int(length)} bytes exceeds the limit of {limit} bytes", 413)
        return None

    def _limit(self, path: str) -> int:
        """The largest body `path` takes: an upload's (multipart framing included), else a request's."""
        if path in self.upload_paths:
            return max(self.max_request_bytes, self.max_upload_bytes + 64 * 1024)
        return self.max_request_bytes

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """The body, as it arrives: counted (bodies without, or lying about, Content-Length) and timed (all of it
        within body_timeout seconds of the request's headers, else a 408 that closes the connection). What the
        app receives after the body (the client's disconnect) is not timed."""
        seen = 0
        timeout = self.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        complete = False

        async def wrapped() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Starlette's HTTPException passes FastAPI's body parsing untouched; errors.py shapes it.
                raise HTTPException(
                    408, f"request body not received within {timeout:g} s", headers={"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
                complete = not message.get("more_body", False)
            return message

        return wrapped

    def _record(
        self, scope: Scope, path: str, status: int, start: float, request_id: str, tenant: Tenant
    ) -> None:
        self.metrics.requests.labels(paths.label(path), scope["method"], str(status)).inc()
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            duration_ms = (time.perf_counter() - start) * 1000
            access_log.info(
                '%s %s "%s %s" %d %.1fms',
                client[0] if client else "-",
                tenant.name,
                scope["method"],
                path,
                status,
                duration_ms,
                extra={
                    "request_id": request_id,
                    "key": tenant.name,
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(duration_ms, 2),
                    "client": client[0] if client else None,
                },
            )


def _offered_key(headers: dict[bytes, bytes]) -> bytes:
    """`Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>` (Anthropic clients)."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() != b"bearer":
        token = headers.get(b"x-api-key", b"")
    return token.strip()


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
