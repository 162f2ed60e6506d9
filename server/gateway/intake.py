"""A request body, from bytes to JSON, without holding up the event loop; and the rule for what else runs off it.

Every API route parses its body here before FastAPI validates it: a body larger than INLINE_BYTES is parsed in
a worker thread (FastAPI then reuses the parsed JSON), a body nested deeper than Python's JSON parser can go is a
400, and so is a string holding a lone UTF-16 surrogate (`"\\ud800"` is valid JSON but no text: it cannot be
encoded, tokenised, logged or echoed), named by its path in the body.

The same size decides where the rest of a request's preparation runs (`off_loop`): its plan (schema checks,
message normalising), the template's rendering and tokenising happen inline for a small body and in a worker
thread for a large one, so nothing a request carries holds the loop for more than a few milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from server.gateway.errors import APIError

T = TypeVar("T")

# Bodies up to this size are parsed and prepared on the event loop (well under a millisecond); larger ones in a
# worker thread.
INLINE_BYTES = 16 * 1024


class IntakeRoute(APIRoute):
    """An APIRoute whose JSON body is parsed by `parse_body` before FastAPI's own handling reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            if request.method == "POST":
                body = await request.body()
                request.state.body_bytes = len(body)
                content_type = request.headers.get("content-type", "application/json")
                if body and content_type.split(";")[0].strip().endswith("json"):
                    parsed = await off_loop(request, parse_body, body)
                    if parsed is not _UNPARSED:
                        request._json = parsed  # Starlette's Request.json() cache, which FastAPI reads
            return await handle(request)

        return parse_then_handle


_UNPARSED = object()


def parse_body(body: bytes) -> Any:
    """JSON -> its value; _UNPARSED when it is not JSON (FastAPI then reports that itself, as always)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise APIError("the request body is nested too deeply", code="invalid_request_body") from None
    except ValueError:
        return _UNPARSED
    if path := _lone_surrogate(value):
        raise APIError(
            f"{path} contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text",
            param=path,
            code="invalid_string",
        )
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The path (`messages[0].content`) of the first string or key holding a lone surrogate, else None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if not _is_text(node):
                return path or "body"
        elif isinstance(node, dict):
            for key, item in node.items():
                where = f"{path}.{key}" if path else key
                if not _is_text(key):
                    return where.encode("utf-8", "backslashreplace").decode()
                stack.append((item, where))
        elif isinstance(node, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))
    return None


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def off_loop(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, inline for a request whose body is small, else in a worker thread."""
    if getattr(request.state, "body_bytes", 0) <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
