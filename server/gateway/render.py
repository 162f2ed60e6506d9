"""Engine steps -> every OpenAI response shape: JSON bodies and SSE streams, the envelope (id, object, created,
model) built once, finish reasons mapped once. All SSE framing lives here: role chunk first, content deltas,
finish_reason on each choice's last chunk, the usage chunk when asked, an error event on failure, `data: [DONE]`.

Chunks are written as compact JSON in OpenAI's field order (the shapes of protocol.ChatCompletionChunk /
protocol.Completion); this is the per-token hot path, so the part of a chunk that is the same for the whole
stream (id, object, created, model, ...) is encoded once per request and each token adds only its choice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from json.encoder import encode_basestring  # the C string encoder json.dumps(ensure_ascii=False) uses
from typing import TypeVar

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.gateway import tools
from server.gateway.engine import (
    EngineDead,
    EngineFailed,
    EngineStep,
    RequestAborted,
    TokenLogprob,
)
from server.gateway.errors import (
    APIError,
    DeadlineExceeded,
    deadline_exceeded,
    engine_failure,
    engine_unavailable,
    shutting_down,
)
from server.gateway.metrics import RequestTimer

log = logging.getLogger("dsv2.render")


@dataclass(frozen=True)
class Envelope:
    """What every body and chunk of one response shares."""

    id: str
    created: int
    model: str

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def finish_reason(reason: str | None) -> str | None:
    """vLLM's finish reasons -> OpenAI's: "repetition" (vLLM's hallucination guard) ends like a stop."""
    if reason is None or reason == "length":
        return reason
    return "stop"


T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def named_sse(kind: str, obj: dict) -> bytes:
    """An SSE event with an `event:` name, as the Anthropic and Responses streams send them."""
    return f"event: {kind}\ndata: {_dumps(obj)}\n\n".encode()


def _frame(base: dict, include_usage: bool) -> tuple[str, str]:
    """The text around a chunk's one choice: `data: {<base>,"choices":[` and `]<,"usage":null>}` + blank line.

    prefix + _dumps(choice) + suffix is byte for byte sse({**base, "choices": [choice], **tail}): the constant
    part of every chunk is encoded once per request instead of once per token.
    """
    prefix = "data: " + _dumps(base)[:-1] + ',"choices":['
    return prefix, ('],"usage":null}\n\n' if include_usage else "]}\n\n")


def _finish_json(finish: str | None) -> str:
    finish = finish_reason(finish)
    return "null" if finish is None else encode_basestring(finish)


def error_event(err: APIError) -> bytes:
    return sse(err.body())


def failure(exc: BaseException, timer: RequestTimer) -> APIError:
    """The error a request that failed after admission ends with (an event in a stream, else the body); counted."""
    if isinstance(exc, RequestAborted):
        timer.failed("aborted")
        return shutting_down()
    if isinstance(exc, EngineDead):
        timer.failed("engine_dead")
        return engine_unavailable()
    if isinstance(exc, DeadlineExceeded):
        timer.failed("deadline")
        return deadline_exceeded(exc)
    if isinstance(exc, APIError):
        return exc
    timer.failed("engine_error")
    if not isinstance(exc, EngineFailed):
        log.error("request failed", exc_info=exc)
    else:
        log.error("engine failed the request: %s", exc)
    return engine_failure(exc)


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens the engine found in its prefix cache."""
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# --- streams -------------------------------------------------------------------------------------------------


class TokenCount:
    """Tokens so far of a stream's engine steps: what stream_options.continuous_usage_stats reports per chunk."""

    def __init__(self) -> None:
        self.completion = 0

    async def count(self, steps: AsyncIterator[T]) -> AsyncIterator[T]:
        async for item in steps:
            step: EngineStep = item[1] if isinstance(item, tuple) else item
            self.completion += sum(c.num_tokens for c in step.choices)
            yield item


async def with_running_usage(
    events: AsyncIterator[bytes], counted: TokenCount, timer: RequestTimer, prompt_tokens: int
) -> AsyncIterator[bytes]:
    """Chunks with `usage` so far added (the request asked for it, so this slower path re-encodes them); the
    final usage chunk, error events and [DONE] pass unchanged. Each chunk follows the step it came from, so the
    count includes that step."""
    async for event in events:
        if event.startswith(b"data: {") and b'"choices":[{' in event:
            obj = json.loads(event[6:])
            obj["usage"] = usage(prompt_tokens, counted.completion, timer.cached_tokens)
            event = sse(obj)
        yield event


async def chat_events(
    steps: AsyncIterator[EngineStep],
    env: Envelope,
    n: int,
    include_usage: bool,
    timer: RequestTimer,
    with_tools: bool = False,
) -> AsyncIterator[bytes]:
    if with_tools:
        async for event in _tool_chat_events(steps, env, n, include_usage, timer):
            yield event
        return
    base = env.head("chat.completion.chunk")
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
                text = c.text
                if c.logprobs is None and text and 0 <= c.index < n:
                    yield (
                        f'{heads[c.index]}{encode_basestring(text)}}},"logprobs":null,'
                        f'"finish_reason":{_finish_json(c.finish_reason)}}}{suffix}'
                    ).encode()
                    continue
                if not text and c.finish_reason is None and not c.logprobs:
                    continue
                yield chunk(
                    {
                        "index": c.index,
                        "delta": {"content": text} if text else {},
                        "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                        "finish_reason": finish_reason(c.finish_reason),
                    }
                )
            if produced:
                timer.tokens()
    except Exception as exc:  # drain abort, engine failure: the headers are sent, so an error event
        yield _failed(exc, timer)
        return
    yield _ending(base, include_usage, timer, prompt_tokens, completion_tokens)


async def _tool_chat_events(
    steps: AsyncIterator[EngineStep], env: Envelope, n: int, include_usage: bool, timer: RequestTimer
) -> AsyncIterator[bytes]:
    """Chat chunks when the model may call tools: its text goes through a CallParser per choice, and comes out
    as content deltas and tool-call deltas exactly as OpenAI streams them (the first delta of a call carries its
    index, id, type and name; later ones fragments of its arguments)."""
    base = env.head("chat.completion.chunk")
    prefix, suffix = _frame(base, include_usage)

    def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return (prefix + _dumps(choice) + suffix).encode()

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    parsers = [tools.CallParser() for _ in range(n)]
    prompt_tokens = completion_tokens = 0
    try:
        async for step in steps:
            prompt_tokens = step.prompt_tokens
            for c in step.choices:
                completion_tokens += c.num_tokens
                parser = parsers[c.index]
                events = parser.feed(c.text) + (parser.close() if c.finish_reason is not None else [])
                logprobs = chat_logprobs(c.logprobs) if c.logprobs else None
                for event in events:
                    yield chunk(c.index, _tool_delta(event), logprobs)
                    logprobs = None
                if logprobs is not None:
                    yield chunk(c.index, {}, logprobs)
                if c.finish_reason is not None:
                    yield chunk(c.index, {}, None, _tool_finish(c.finish_reason, parser.calls))
            if any(c.num_tokens for c in step.choices):
                timer.tokens()
    except Exception as exc:  # drain abort, engine failure: the headers are sent, so an error event
        yield _failed(exc, timer)
        return
    yield _ending(base, include_usage, timer, prompt_tokens, completion_tokens)


def _tool_delta(event: tools.Event) -> dict:
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "call":
        return {
            "tool_calls": [
                {
                    "index": event.index,
                    "id": event.call_id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            ]
        }
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def _tool_finish(reason: str | None, calls: int) -> str | None:
    """OpenAI's "tool_calls" when the model called a tool and was not cut off by max_tokens."""
    reason = finish_reason(reason)
    return "tool_calls" if calls and reason == "stop" else reason


async def completion_events(
    steps: AsyncIterator[tuple[int, EngineStep]],
    env: Envelope,
    n: int,
    echo: list[str] | None,
    include_usage: bool,
    timer: RequestTimer,
) -> AsyncIterator[bytes]:
    """`steps` yields (prompt index, step); choice index = prompt index * n + the step's choice index.

    echo: per prompt, its text, sent (with its token logprobs when asked) before the choice's first delta.
    """
    base = env.head("text_completion")
    prefix, suffix = _frame(base, include_usage)
    offsets: dict[int, int] = {}
    echo_logprobs: dict[int, list[TokenLogprob | None]] = {}
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
            if step.prompt_logprobs is not None:
                echo_logprobs.setdefault(p, step.prompt_logprobs)
            produced = False
            for c in step.choices:
                index = p * n + c.index
                completion_tokens += c.num_tokens
                produced = produced or c.num_tokens > 0
                text, lp = c.text, None
                if echo is not None and index not in echoed:
                    echoed.add(index)
                    text = echo[p] + text
                    if c.logprobs is not None and p in echo_logprobs:
                        lp, offsets[index] = completion_logprobs(echo_logprobs[p], 0)
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
                timer.tokens()
    except Exception as exc:  # drain abort, engine failure: the headers are sent, so an error event
        yield _failed(exc, timer)
        return
    yield _ending(base, include_usage, timer, sum(prompt_tokens.values()), completion_tokens)


def _failed(exc: Exception, timer: RequestTimer) -> bytes:
    return error_event(failure(exc, timer)) + DONE


def _ending(
    base: dict, include_usage: bool, timer: RequestTimer, prompt_tokens: int, completion_tokens: int
) -> bytes:
    """The usage chunk when asked, then [DONE]; the request's token counts recorded."""
    timer.done(prompt_tokens, completion_tokens)
    if not include_usage:
        return DONE
    body = {**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, timer.cached_tokens)}
    return sse(body) + DONE


class SSEResponse(StreamingResponse):
    """text/event-stream that holds `owner` (the request's admission slot) open until the stream ends, however
    it ends: finished, failed, or the client left (Starlette then stops the body iterator and `owner` aborts
    what the engine still runs).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], owner: AbstractAsyncContextManager) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type=self.media_type,
        )
        self._owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self._owner:
            await super().__call__(scope, receive, send)


# --- buffered (non-streamed) results ---------------------------------------------------------------------------


class Result:
    """One prompt's whole output, for a non-streamed response."""

    __slots__ = (
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "texts",
        "logprobs",
        "finish",
        "stop",
        "prompt_logprobs",
    )

    def __init__(self, n: int) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob] | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.stop: list[str | None] = [None] * n  # the stop string that ended each choice
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, step: EngineStep) -> None:
        self.prompt_tokens = step.prompt_tokens
        self.cached_tokens += step.cached_tokens or 0
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs
        for c in step.choices:
            self.texts[c.index] += c.text
            self.completion_tokens += c.num_tokens
            if c.logprobs is not None:
                if self.logprobs[c.index] is None:
                    self.logprobs[c.index] = []
                self.logprobs[c.index].extend(c.logprobs)
            if c.finish_reason is not None:
                self.finish[c.index] = c.finish_reason
                self.stop[c.index] = c.stop_sequence


async def collect(
    steps: AsyncIterator[tuple[int, EngineStep]], prompts: int, n: int, timer: RequestTimer
) -> list[Result]:
    """Every prompt's output; a failure is counted and raised as the APIError the client gets."""
    results = [Result(n) for _ in range(prompts)]
    try:
        async for p, step in steps:
            if step.first_token_time is not None or any(c.num_tokens for c in step.choices):
                timer.first_token_at(step.first_token_time)
            results[p].add(step)
    except (RequestAborted, EngineDead, EngineFailed, DeadlineExceeded) as exc:
        raise failure(exc, timer) from exc
    timer.done(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
    return results


def chat_body(env: Envelope, r: Result, with_tools: bool = False) -> JSONResponse:
    choices = []
    for i, text in enumerate(r.texts):
        message: dict = {"role": "assistant", "content": text, "refusal": None}
        finish = finish_reason(r.finish[i]) or "stop"
        if with_tools:
            parsed = tools.parse(text)
            if parsed.calls:
                message["content"] = parsed.content or None
                message["tool_calls"] = [call.body() for call in parsed.calls]
                finish = _tool_finish(finish, len(parsed.calls))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(r.logprobs[i]) if r.logprobs[i] is not None else None,
                "finish_reason": finish,
            }
        )
    return JSONResponse(
        {
            **env.head("chat.completion"),
            "choices": choices,
            "usage": usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
        }
    )


def completion_body(
    env: Envelope, results: list[Result], echo: list[str] | None, logprobs: bool
) -> JSONResponse:
    choices = []
    for p, r in enumerate(results):
        for i, text in enumerate(r.texts):
            lp = None
            if logprobs:
                tokens: list[TokenLogprob | None] = list(r.prompt_logprobs or []) if echo is not None else []
                tokens.extend(r.logprobs[i] or [])
                lp, _ = completion_logprobs(tokens, 0)
            choices.append(
                {
                    "index": p * len(r.texts) + i,
                    "text": echo[p] + text if echo is not None else text,
                    "logprobs": lp,
                    "finish_reason": finish_reason(r.finish[i]) or "stop",
                }
            )
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return JSONResponse(
        {
            **env.head("text_completion"),
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, sum(r.cached_tokens for r in results)),
        }
    )


def model_card(model_id: str, created: int, max_model_len: int, root: str, parent: str | None) -> dict:
    """OpenAI's model object, with vLLM's extras: the context length, the weights' `root`, and for a LoRA
    adapter its base model as `parent`."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "dsv2-serve",
        "max_model_len": max_model_len,
        "root": root,
        "parent": parent,
    }
