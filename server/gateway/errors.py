"""Exceptions -> OpenAI error JSON: {"error": {"message", "type", "param", "code"}} for every status.

An engine's rejection of a request (EngineRejected) becomes a 400 here; failures after admission are shaped by
stream.failure. Unexpected exceptions are answered by the middleware (with the request id).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from server.gateway import paths
from server.gateway.engine import EngineRejected
from server.gateway.startup import RETRY_AFTER_S, Startup

log = logging.getLogger("dsv2.errors")

# OpenAI's error `type` per status.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    504: "timeout_error",
    503: "server_error",
}
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
}


class DeadlineExceeded(Exception):
    """A request ran past its deadline (--max-request-seconds or X-Request-Timeout)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request exceeded its deadline of {seconds:g} s")
        self.seconds = seconds


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


class APIError(Exception):
    """A request failure with its OpenAI error fields; 400 unless told otherwise."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code if code is not None else _CODES.get(status)
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """The same error in Anthropic's shape, for the /v1/messages path."""
        kind = _ANTHROPIC_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str = "") -> Response:
        body = self.anthropic_body() if paths.anthropic(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class StartingUp(APIError):
    """503 while the model starts (server.gateway.startup): Retry-After, and the phase and its progress beside
    the error for probes and people."""

    def __init__(self, startup: Startup) -> None:
        super().__init__(
            f"the model is starting: {startup.describe()} ({startup.elapsed():.0f} s so far)",
            503,
            code="starting",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
        self.phase = startup.phase
        self.progress = startup.progress

    def body(self) -> dict:
        return {**super().body(), "phase": self.phase, "progress": self.progress}


_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _loc_to_param(loc: tuple | list) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role", without pydantic's union-member tags."""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not _is_union_tag(p):
            out += ("." if out else "") + p
    return out or None


def _is_union_tag(part: str) -> bool:
    # e.g. "str", "list[int]", "function-after[...]", "tagged-union[...]", or a model's class name
    return part in _UNION_TAGS or "[" in part or part.startswith("function-") or part[:1].isupper()


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("invalid request")
    first = errors[0]
    param = _loc_to_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return APIError(
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", param=None
        )
    if first.get("type") == "missing":
        return APIError(f"'{param}' is a required property", param=param)
    detail = f"invalid value for '{param}': {msg}" if param else msg
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return APIError(detail, param=param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            message = f"unknown route {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        return APIError(message, status, headers=dict(exc.headers or {})).response(request.url.path)

    @app.exception_handler(EngineRejected)
    async def _rejected(request: Request, exc: EngineRejected) -> Response:
        return APIError(str(exc), param=exc.param).response(request.url.path)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log and metrics do


def shutting_down() -> APIError:
    return APIError("the server is shutting down; retry on another replica", 503, code="shutting_down")


def engine_unavailable() -> APIError:
    return APIError("the engine is not available", 503, code="engine_unavailable")


def engine_failure(exc: Exception) -> APIError:
    """What a client sees when the engine failed its request: no internals, a retryable 500."""
    return APIError("the engine failed to complete the request; retry it", 500, code="engine_error")


def deadline_exceeded(exc: DeadlineExceeded) -> APIError:
    return APIError(
        f"{exc}; ask for fewer tokens, or a longer deadline with the X-Request-Timeout header",
        504,
        code="deadline_exceeded",
        type="timeout_error",
    )


def internal_error() -> APIError:
    return APIError("internal server error", 500)
