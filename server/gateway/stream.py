"""Engine steps -> SSE events: role chunk first, content deltas, finish_reason on each choice's last chunk,
the usage chunk when asked, `data: [DONE]`. All SSE framing lives here.

Chunks are written as compact JSON in OpenAI's field order (the shapes of protocol.ChatCompletionChunk /
protocol.Completion); this is the per-token hot path, so the part of a chunk that is the same for the whole
stream (id, object, created, model, ...) is encoded once per request and each token adds only its choice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from json.encoder import encode_basestring  # the C string encoder json.dumps(ensure_ascii=False) uses

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.gateway.engine import EngineStep, TokenLogprob
from server.gateway.errors import APIError

log = logging.getLogger("dsv2.stream")

DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def _frame(base: dict, include_usage: bool) -> tuple[str, str]:
    """The text around a chunk's one choice: `data: {<base>,"choices":[` and `]<,"usage":null>}` + blank line.

    prefix + _dumps(choice) + suffix is byte for byte sse({**base, "choices": [choice], **tail}): the constant
    part of every chunk is encoded once per request instead of once per token.
    """
    prefix = "data: " + _dumps(base)[:-1] + ',"choices":['
    return prefix, ('],"usage":null}\n\n' if include_usage else "]}\n\n")


def _finish_json(finish: str | None) -> str:
    return "null" if finish is None else encode_basestring(finish)


def error_event(err: APIError) -> bytes:
    return sse(err.body())


def failure_event(request_id: str, exc: Exception) -> bytes:
    """The error event that ends a stream which failed after its headers were sent."""
    if isinstance(exc, StreamAborted):
        return error_event(APIError("request aborted: the server is shutting down", 503))
    if isinstance(exc, APIError):
        return error_event(exc)
    log.error("stream %s failed", request_id, exc_info=exc)
    return error_event(APIError(f"engine error: {exc or type(exc).__name__}", 500))


# --- logprob shapes ------------------------------------------------------------------------------------------


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenLogprob | None], offset: int) -> tuple[dict, int]:
    """Legacy completions logprobs; returns it and the text offset after these tokens."""
    out: dict = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for t in tokens:
        out["text_offset"].append(offset)
        if t is None:  # the first prompt token has no logprob
            out["token_logprobs"].append(None)
            out["tokens"].append("")
            out["top_logprobs"].append(None)
            continue
        out["tokens"].append(t.token)
        out["token_logprobs"].append(t.logprob)
        top = {tok: lp for tok, lp in t.top}
        top.setdefault(t.token, t.logprob)
        out["top_logprobs"].append(top)
        offset += len(t.token)
    return out, offset


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- event generators ----------------------------------------------------------------------------------------


class StreamAborted(Exception):
    """The engine aborted the request (drain timeout): reported to the client as an error event."""


async def chat_events(
    steps: AsyncIterator[EngineStep],
    *,
    request_id: str,
    model: str,
    created: int,
    n: int,
    include_usage: bool,
    on_tokens: Callable[[], None],
    on_done: Callable[[int, int], None],
) -> AsyncIterator[bytes]:
    base = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    prefix, suffix = _frame(base, include_usage)

    def chunk(choice: dict) -> bytes:
        return (prefix + _dumps(choice) + suffix).encode()

    for i in range(n):
        yield chunk(
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    # The usual chunk (text, no logprobs) is assembled from pre-encoded pieces; anything else goes through chunk().
    heads = [f'{prefix}{{"index":{i},"delta":{{"content":' for i in range(n)]
    prompt_tokens = completion_tokens = 0
    try:
        async for step in steps:
            prompt_tokens = step.prompt_tokens
            produced = False
            for c in step.choices:
                completion_tokens += c.num_tokens
                produced = produced or c.num_tokens > 0
                finish = c.finish_reason
                if finish == "abort":
                    raise StreamAborted()
                text = c.text
                if c.logprobs is None and text and 0 <= c.index < n:
                    yield (
                        f'{heads[c.index]}{encode_basestring(text)}}},"logprobs":null,'
                        f'"finish_reason":{_finish_json(finish)}}}{suffix}'
                    ).encode()
                    continue
                if not text and finish is None and not c.logprobs:
                    continue
                yield chunk(
                    {
                        "index": c.index,
                        "delta": {"content": text} if text else {},
                        "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                        "finish_reason": finish,
                    }
                )
            if produced:
                on_tokens()
    except Exception as exc:  # drain abort, a late request error, or an engine failure mid-stream
        yield failure_event(request_id, exc)
        yield DONE
        return
    on_done(prompt_tokens, completion_tokens)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield DONE


async def completion_events(
    steps: AsyncIterator[tuple[int, EngineStep]],
    *,
    request_id: str,
    model: str,
    created: int,
    n: int,
    echo: list[tuple[str, list[TokenLogprob | None] | None]] | None,
    include_usage: bool,
    on_tokens: Callable[[], None],
    on_done: Callable[[int, int], None],
) -> AsyncIterator[bytes]:
    """`steps` yields (prompt index, step); choice index = prompt index * n + the step's choice index.

    echo: per prompt, its text and (when logprobs were asked) its token logprobs, sent before the first delta.
    """
    base = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    prefix, suffix = _frame(base, include_usage)
    offsets: dict[int, int] = {}
    echoed: set[int] = set()
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0

    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> bytes:
        return (
            f'{prefix}{{"index":{index},"text":{encode_basestring(text)},'
            f'"logprobs":{"null" if logprobs is None else _dumps(logprobs)},'
            f'"finish_reason":{_finish_json(finish)}}}{suffix}'
        ).encode()

    try:
        async for p, step in steps:
            prompt_tokens[p] = step.prompt_tokens
            produced = False
            for c in step.choices:
                index = p * n + c.index
                completion_tokens += c.num_tokens
                produced = produced or c.num_tokens > 0
                if c.finish_reason == "abort":
                    raise StreamAborted()
                text, lp = c.text, None
                if echo is not None and index not in echoed:
                    echoed.add(index)
                    echo_text, echo_lps = echo[p]
                    text = echo_text + text
                    if c.logprobs is not None and echo_lps is not None:
                        lp, offsets[index] = completion_logprobs(echo_lps, 0)
                if c.logprobs is not None:
                    more, offsets[index] = completion_logprobs(c.logprobs, offsets.get(index, 0))
                    if lp is None:
                        lp = more
                    else:
                        for key in lp:
                            lp[key].extend(more[key])
                if not text and c.finish_reason is None and lp is None:
                    continue
                yield chunk(index, text, lp, c.finish_reason)
            if produced:
                on_tokens()
    except Exception as exc:  # drain abort, a late request error, or an engine failure mid-stream
        yield failure_event(request_id, exc)
        yield DONE
        return
    total_prompt = sum(prompt_tokens.values())
    on_done(total_prompt, completion_tokens)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(total_prompt, completion_tokens)})
    yield DONE


class SSEResponse(StreamingResponse):
    """text/event-stream whose `on_close` runs however the response ends: finished, failed, or the client left.

    Starlette cancels the body iterator when the client disconnects (ASGI spec < 2.4), which aborts the engine
    request; `on_close` also covers a body iterator that never started.
    """

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], headers=None
    ) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
            media_type=self.media_type,
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
