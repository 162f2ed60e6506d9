"""The loop's deltas (stream.py) -> OpenAI's chat and completions shapes: JSON bodies and SSE streams, the
envelope (id, object, created, model) built once. The SSE framing of every API lives here: role chunk first,
content deltas, finish_reason on each choice's last chunk, the usage chunk when asked, an error event on failure,
`data: [DONE]`; and `named_sse` for the Responses and Anthropic streams.

Chunks are written as compact JSON in OpenAI's field order (the shapes of bodies.ChatCompletionChunk /
bodies.Completion); this is the per-token hot path, so the part of a chunk that is the same for the whole
stream (id, object, created, model, ...) is encoded once per request and each token adds only its choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from json.encoder import encode_basestring  # the C string encoder json.dumps(ensure_ascii=False) uses

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from server.gateway import tools
from server.gateway.admission import SlowClient
from server.gateway.connections import DROP_CONNECTION, WRITABLE, WRITE
from server.gateway.engine import TokenLogprob
from server.gateway.errors import APIError
from server.gateway.stream import Answer, Stream, Usage

log = logging.getLogger("dsv2.render")


@dataclass(frozen=True)
class Envelope:
    """What every body and chunk of one response shares."""

    id: str
    created: int
    model: str

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


DONE = b"data: [DONE]\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def named_sse(kind: str, obj: dict) -> bytes:
    """An SSE event with an `event:` name, as the Anthropic and Responses streams send them."""
    return f"event: {kind}\ndata: {_dumps(obj)}\n\n".encode()


class _Frame:
    """The text around a chunk's one choice: `data: {<base>,"choices":[` and `]<,"usage":...>}` + blank line.

    prefix + _dumps(choice) + suffix() is byte for byte sse({**base, "choices": [choice], **tail}): the constant
    part of every chunk is encoded once per request instead of once per token. The tail is `"usage":null` when
    the stream ends with usage, the usage so far with continuous usage stats, and nothing otherwise.
    """

    def __init__(self, base: dict, include_usage: bool, running: Usage | None) -> None:
        self.prefix = "data: " + _dumps(base)[:-1] + ',"choices":['
        self.constant = '],"usage":null}\n\n' if include_usage else "]}\n\n"
        self.running = running

    def suffix(self) -> str:
        if self.running is None:
            return self.constant
        return '],"usage":' + _dumps(usage(self.running)) + "}\n\n"


def _finish_json(finish: str | None) -> str:
    return "null" if finish is None else encode_basestring(finish)


def error_event(err: APIError) -> bytes:
    return sse(err.body()) + DONE


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


def usage(u: Usage) -> dict:
    """OpenAI's usage, with the prompt tokens the engine found in its prefix cache."""
    return {
        "completion_tokens": u.completion_tokens,
        "prompt_tokens": u.prompt_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


# --- streams -------------------------------------------------------------------------------------------------


async def chat_events(
    stream: Stream, env: Envelope, n: int, include_usage: bool, continuous: bool = False
) -> AsyncIterator[bytes]:
    """Chat chunks: each choice's role chunk, then its deltas (text, or with tools content and tool-call deltas
    exactly as OpenAI streams them: a call's first delta carries its index, id, type and name, later ones
    fragments of its arguments), finish_reason on each choice's last chunk, the usage chunk when asked, [DONE].
    The chunks of one engine step (one per choice, or a tool call's several) come as one piece: one send."""
    base = env.head("chat.completion.chunk")
    frame = _Frame(base, include_usage, stream.usage if continuous else None)
    prefix = frame.prefix

    def chunk(
        index: int, delta: dict, logprobs: list[TokenLogprob] | None = None, finish: str | None = None
    ) -> bytes:
        lp = chat_logprobs(logprobs) if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return (prefix + _dumps(choice) + frame.suffix()).encode()

    yield b"".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(n))
    constant = frame.constant if frame.running is None else None
    # The usual chunk (text, no logprobs) is assembled from pre-encoded pieces; anything else goes through chunk().
    heads = [f'{prefix}{{"index":{i},"delta":{{"content":' for i in range(n)]
    async for deltas in stream:
        out: list[bytes] = []
        for d in deltas:
            if d.events is not None:
                out += _tool_chunks(d, chunk)
            elif d.logprobs is None and d.text:
                out.append(
                    f'{heads[d.index]}{encode_basestring(d.text)}}},"logprobs":null,'
                    f'"finish_reason":{_finish_json(d.finish)}}}{constant or frame.suffix()}'.encode()
                )
            elif d.text or d.finish is not None or d.logprobs:
                out.append(chunk(d.index, {"content": d.text} if d.text else {}, d.logprobs, d.finish))
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
    yield _ending(stream, base, include_usage)


def _tool_chunks(d, chunk) -> list[bytes]:
    """A delta with tools: a chunk per event (its logprobs on the first), then the finish on a chunk of its own."""
    out, logprobs = [], d.logprobs or None
    for event in d.events:
        out.append(chunk(d.index, _tool_delta(event), logprobs))
        logprobs = None
    if logprobs is not None:
        out.append(chunk(d.index, {}, logprobs))
    if d.finish is not None:
        out.append(chunk(d.index, {}, None, d.finish))
    return out


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


async def completion_events(
    stream: Stream,
    env: Envelope,
    n: int,
    echo: list[str] | None,
    include_usage: bool,
    continuous: bool = False,
) -> AsyncIterator[bytes]:
    """Completion chunks; choice index = prompt index * n + choice. echo: per prompt, its text, sent (with its
    token logprobs when asked) before the choice's first delta. The chunks of one engine step come as one piece."""
    base = env.head("text_completion")
    frame = _Frame(base, include_usage, stream.usage if continuous else None)
    offsets: dict[int, int] = {}
    echoed: set[int] = set()

    def chunk(index: int, text: str, logprobs: dict | None, finish: str | None) -> bytes:
        return (
            f'{frame.prefix}{{"index":{index},"text":{encode_basestring(text)},'
            f'"logprobs":{"null" if logprobs is None else _dumps(logprobs)},'
            f'"finish_reason":{_finish_json(finish)}}}{frame.suffix()}'
        ).encode()

    async for deltas in stream:
        out: list[bytes] = []
        for d in deltas:
            text, lp = d.text, None
            if echo is not None and d.index not in echoed:
                echoed.add(d.index)
                p = d.index // n
                text = echo[p] + text
                if d.logprobs is not None and p in stream.prompt_logprobs:
                    lp, offsets[d.index] = completion_logprobs(stream.prompt_logprobs[p], 0)
            if d.logprobs is not None:
                more, offsets[d.index] = completion_logprobs(d.logprobs, offsets.get(d.index, 0))
                if lp is None:
                    lp = more
                else:
                    for key in lp:
                        lp[key].extend(more[key])
            if text or d.finish is not None or lp is not None:
                out.append(chunk(d.index, text, lp, d.finish))
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
    yield _ending(stream, base, include_usage)


def _ending(stream: Stream, base: dict, include_usage: bool) -> bytes:
    """An error event if the stream failed; else the usage chunk when asked; then [DONE]."""
    if stream.failure is not None:
        return error_event(stream.failure)
    if not include_usage:
        return DONE
    return sse({**base, "choices": [], "usage": usage(stream.usage)}) + DONE


class SSEResponse(StreamingResponse):
    """text/event-stream whose events are rendered, in a task of their own, and sent, each send given
    `send_timeout` seconds.

    `owner` (the request's admission slot, token account and trace) is closed once the stream is rendered, however
    it ended (finished, failed, past its deadline, aborted by a drain), even while its bytes still wait for the
    client: the in-flight budget counts engine work, not bytes in a socket. While the connection takes data
    (connections.WRITABLE), the rendering task sends each event itself, as soon as it is rendered (straight to the
    connection where it offers connections.WRITE, else through `send`); otherwise events go to an outbox that a
    sending task empties, holding OUTBOX_BYTES at most; past that, rendering waits for the client. A client that
    leaves, or takes no data for `send_timeout` seconds (its connection is then dropped), stops the rendering, and
    `owner` aborts what the engine still runs for it (`client_disconnected`, `slow_client`).
    """

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[bytes], owner: AbstractAsyncContextManager, send_timeout: float
    ) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type=self.media_type,
        )
        self._owner = owner
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        extensions = scope.get("extensions") or {}
        outbox = _Outbox(OUTBOX_BYTES, loop)
        rendering = loop.create_task(
            self._render(outbox, send, extensions.get(WRITABLE), extensions.get(WRITE))
        )
        sending = loop.create_task(self._send(send, outbox))
        leaving = loop.create_task(_client_left(receive))
        timer = _SendTimer(loop, outbox, sending, self.send_timeout)
        try:
            await asyncio.wait({sending, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            leaving.cancel()
            if not sending.done():  # the client left (or this response was cancelled)
                sending.cancel()
            rendering.cancel()  # nothing once rendered; else `owner` aborts the engine's work
            await asyncio.wait({rendering, sending})
        if outbox.slow:
            log.warning(
                "the client took no data for %g s (--stream-send-timeout): stream dropped", self.send_timeout
            )
            drop = extensions.get(DROP_CONNECTION)
            if drop is not None:
                drop()
                with contextlib.suppress(TimeoutError):  # the server sees it go: the response ends as dropped
                    await asyncio.wait_for(_client_left(receive), 1.0)
        elif not sending.cancelled():
            sending.result()  # a failure of the rendering, raised once what came before it is sent

    async def _render(
        self,
        outbox: _Outbox,
        send: Send,
        writable: Callable[[], bool] | None,
        write: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Every event sent, or into the outbox; then `owner` closed.

        An event goes out from here when nothing waits before it (the sender is idle) and the connection takes data:
        the send then completes without waiting, and the sending task is not woken for it (a task switch per token
        saved), and with `write` without the ASGI send (a call, where a send is a coroutine per wrapper). Otherwise
        it waits in the outbox for the sending task, which alone waits for a slow client."""
        loop = outbox.loop
        try:
            async with self._owner:
                try:
                    async for chunk in self.body_iterator:
                        if write is not None and outbox.idle and write(chunk):
                            continue
                        if writable is not None and outbox.idle and writable():
                            outbox.send_started = loop.time()
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                            outbox.send_started = None
                        else:
                            await outbox.put(chunk)
                except asyncio.CancelledError:
                    if outbox.slow:
                        raise SlowClient() from None  # `owner` aborts with this reason
                    raise
        except SlowClient:
            pass
        except Exception as exc:
            outbox.error = exc
        finally:
            outbox.close()

    async def _send(self, send: Send, outbox: _Outbox) -> None:
        """The headers, then what the outbox holds as it comes, then the end; each send timed by _SendTimer."""
        start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        await self._timed(send, start, outbox)
        while (data := await outbox.take()) is not None:
            await self._timed(send, {"type": "http.response.body", "body": data, "more_body": True}, outbox)
        if outbox.error is not None:
            raise outbox.error
        await self._timed(send, {"type": "http.response.body", "body": b"", "more_body": False}, outbox)

    @staticmethod
    async def _timed(send: Send, message: Message, outbox: _Outbox) -> None:
        outbox.send_started = outbox.loop.time()
        await send(message)
        outbox.send_started = None


# Rendered bytes a stream may hold for a client that is not taking them; past it, rendering waits for the client
# (and only the send timeout ends that wait).
OUTBOX_BYTES = 1 << 20


class _Outbox:
    """One stream's rendered bytes on their way out: the renderer puts, the sender takes all there is at once."""

    def __init__(self, cap: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cap = cap
        self.loop = loop
        self.chunks: list[bytes] = []
        self.size = 0
        self.closed = False  # rendering is over: nothing more comes
        self.error: Exception | None = None  # why rendering failed, if it did
        self.slow = False  # the client took no data for the send timeout
        # loop.time() when the send in flight began; None between sends.
        self.send_started: float | None = None
        # Plain futures, not asyncio.Events: an Event looks up the running loop at every wait.
        self._filled: asyncio.Future | None = None  # the sender's wait for chunks
        self._room: asyncio.Future | None = None  # the renderer's wait for room

    @property
    def idle(self) -> bool:
        """The sender waits for chunks (so none are queued): a send made now is in order."""
        return self._filled is not None

    async def put(self, chunk: bytes) -> None:
        while self.size >= self.cap:
            self._room = self.loop.create_future()
            await self._room
        self.chunks.append(chunk)
        self.size += len(chunk)
        self._wake_sender()

    async def take(self) -> bytes | None:
        """Everything waiting, as one piece; None once rendering is over and everything was taken."""
        while not self.chunks:
            if self.closed:
                return None
            self._filled = self.loop.create_future()
            try:
                await self._filled
            finally:
                self._filled = None
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)
        return data

    def close(self) -> None:
        self.closed = True
        self._wake_sender()

    def _wake_sender(self) -> None:
        filled, self._filled = self._filled, None
        if filled is not None and not filled.done():
            filled.set_result(None)


class _SendTimer:
    """One timer per stream instead of one per send (a send is a clock read): a send still in flight `timeout`
    seconds after it began marks the client slow and cancels `sending`, which stops the stream."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, outbox: _Outbox, sending: asyncio.Task, timeout: float
    ) -> None:
        self.loop, self.outbox, self.sending, self.timeout = loop, outbox, sending, timeout
        self.handle = loop.call_later(timeout, self._check)

    def _check(self) -> None:
        started, now = self.outbox.send_started, self.loop.time()
        if started is not None and now - started >= self.timeout:
            self.outbox.slow = True
            self.sending.cancel()
            return
        self.handle = self.loop.call_at((now if started is None else started) + self.timeout, self._check)

    def cancel(self) -> None:
        self.handle.cancel()


async def _client_left(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# --- non-streamed bodies ---------------------------------------------------------------------------------------


def chat_body(env: Envelope, answers: list[Answer], u: Usage) -> JSONResponse:
    choices = []
    for i, a in enumerate(answers):
        message: dict = {"role": "assistant", "content": a.text, "refusal": None}
        if a.calls:
            message["content"] = a.text or None
            message["tool_calls"] = [call.body() for call in a.calls]
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(a.logprobs) if a.logprobs is not None else None,
                "finish_reason": a.finish,
            }
        )
    return JSONResponse({**env.head("chat.completion"), "choices": choices, "usage": usage(u)})


def completion_body(
    env: Envelope,
    answers: list[Answer],
    u: Usage,
    n: int,
    echo: list[str] | None,
    logprobs: bool,
    prompt_logprobs: dict[int, list[TokenLogprob | None]],
) -> JSONResponse:
    choices = []
    for index, a in enumerate(answers):
        p = index // n
        lp = None
        if logprobs:
            tokens: list[TokenLogprob | None] = list(prompt_logprobs.get(p) or []) if echo is not None else []
            tokens.extend(a.logprobs or [])
            lp, _ = completion_logprobs(tokens, 0)
        choices.append(
            {
                "index": index,
                "text": echo[p] + a.text if echo is not None else a.text,
                "logprobs": lp,
                "finish_reason": a.finish,
            }
        )
    return JSONResponse({**env.head("text_completion"), "choices": choices, "usage": usage(u)})


def model_card(model_id: str, created: int, max_model_len: int, root: str, parent: str | None) -> dict:
    """OpenAI's model object, with vLLM's extras: the context length, `root` (a name, never a path), and for a
    LoRA adapter its base model as `parent`."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "dsv2-serve",
        "max_model_len": max_model_len,
        "root": root,
        "parent": parent,
    }
