"""A batch's input file, line by line, checked before anything runs: each line is JSON with a unique `custom_id`,
`method` POST, the batch's `url`, and a `body` the endpoint's request model accepts. A file with bad lines fails
its batch with one error per line (`line` numbered from 1), as OpenAI's does.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from server.gateway import paths, protocol, responses
from server.gateway.errors import APIError
from server.gateway.intake import _UNPARSED, parse_body

# The endpoints a batch may run, and the request model each line's body must satisfy.
ENDPOINTS: dict[str, type[BaseModel]] = {
    paths.CHAT: protocol.ChatCompletionRequest,
    paths.COMPLETIONS: protocol.CompletionRequest,
    paths.RESPONSES: responses.ResponsesRequest,
}
MAX_ERRORS = 100  # errors listed on a failed batch, as a client reads them
MAX_CUSTOM_ID = 512  # the store's column


@dataclass
class Line:
    no: int  # the line's place in the file, from 0
    custom_id: str
    body: dict


def parse(data: bytes, endpoint: str) -> tuple[list[Line], list[dict]]:
    """The file's lines, or (when any is bad) the errors: {code, message, param, line} per bad line."""
    lines: list[Line] = []
    errors: list[dict] = []
    seen: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_error("invalid_file", "the file is not UTF-8 text", None, None)]
    for i, raw in enumerate(text.splitlines()):
        if not raw.strip():
            continue
        problem = _check(raw, endpoint, seen)
        if isinstance(problem, Line):
            problem.no = i
            lines.append(problem)
        else:
            errors.append(_error(problem[0], problem[1], problem[2], i + 1))
    if not lines and not errors:
        errors.append(_error("empty_file", "the file has no requests", None, None))
    return lines, errors[:MAX_ERRORS]


def _check(raw: str, endpoint: str, seen: set[str]) -> Line | tuple[str, str, str | None]:
    try:
        item = parse_body(raw.encode())  # as a live request's body: too deep or a lone surrogate is a 400
    except APIError as exc:
        return "invalid_request", exc.message, exc.param
    if item is _UNPARSED:
        return "invalid_json_line", "this line is not valid JSON", None
    if not isinstance(item, dict):
        return "invalid_request", "each line must be a JSON object", None
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", "custom_id must be a non-empty string", "custom_id"
    if len(custom_id) > MAX_CUSTOM_ID or "\0" in custom_id:
        return (
            "invalid_custom_id",
            f"custom_id must be at most {MAX_CUSTOM_ID} characters, without NUL",
            "custom_id",
        )
    if custom_id in seen:
        return "duplicate_custom_id", f"the custom_id {custom_id!r} is used by an earlier line", "custom_id"
    seen.add(custom_id)
    if item.get("method") != "POST":
        return "invalid_method", f"method must be POST, not {item.get('method')!r}", "method"
    if item.get("url") != endpoint:
        return "mismatched_url", f"url {item.get('url')!r} is not the batch's endpoint {endpoint}", "url"
    body = item.get("body")
    if not isinstance(body, dict):
        return "invalid_request", "body must be a JSON object", "body"
    if body.get("stream"):
        return "invalid_request", "a batch request cannot stream (stream: true)", "body.stream"
    try:
        ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return "invalid_request", f"body.{where}: {first['msg']}", f"body.{where}"
    return Line(0, custom_id, body)


def _error(code: str, message: str, param: str | None, line: int | None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}
