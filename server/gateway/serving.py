"""The serving layer: request -> template -> engine -> response or stream, with admission and drain state.

Routes call one method of `Gateway` each. A generation request holds one admission slot from before its prompt
is tokenised until its response ends (normally, by error, or by client disconnect, which aborts the engine
request at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.gateway import stream
from server.gateway.engine import (
    ChoiceDelta,
    Engine,
    EngineDead,
    EngineRejected,
    EngineStep,
    SamplingOptions,
    TokenLogprob,
)
from server.gateway.errors import APIError
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.protocol import ChatCompletionRequest, CompletionRequest
from server.gateway.template import ChatTemplate, normalize_messages
from server.settings import Settings

log = logging.getLogger("dsv2.serving")
T = TypeVar("T")

# Prompts longer than this (characters) are tokenised off the event loop.
_INLINE_TOKENIZE_CHARS = 8192
READY_TIMEOUT_S = 30.0


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Flight:
    """One admitted generation request."""

    __slots__ = ("request_id", "engine_ids", "finished")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.engine_ids: list[str] = [request_id]
        self.finished = False


class Gateway:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Engine | None = None
        self.template: ChatTemplate | None = None
        self.model_name = settings.model_name
        self.created = int(time.time())
        self.draining = False
        self.flights: dict[str, Flight] = {}
        self._ready_until = 0.0
        self._ready_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    # --- admission, abort, drain ----------------------------------------------------------------------------

    def _admit(self, prefix: str) -> Flight:
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise APIError("the server is shutting down; retry on another replica", 503, code="shutting_down")
        if self.engine is None or self.engine.is_dead:
            self.metrics.rejected.labels("engine_unavailable").inc()
            raise APIError("the engine is not available", 503, code="engine_unavailable")
        limit = self.settings.max_concurrent_requests
        if len(self.flights) >= limit:
            self.metrics.rejected.labels("overloaded").inc()
            raise APIError(
                f"too many requests in flight (limit {limit}); retry shortly",
                429,
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        flight = Flight(f"{prefix}-{uuid.uuid4().hex}")
        self.flights[flight.request_id] = flight
        self.metrics.in_flight.set(len(self.flights))
        return flight

    def _release(self, flight: Flight) -> None:
        if self.flights.pop(flight.request_id, None) is not None:
            self.metrics.in_flight.set(len(self.flights))
        if not flight.finished:
            flight.finished = True
            for engine_id in flight.engine_ids:
                self._spawn(self._abort(engine_id))

    def _spawn(self, coro: Awaitable[None]) -> None:
        # A task of its own: an abort must not be swallowed by the cancellation of the request that asked for it.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abort(self, engine_id: str) -> None:
        try:
            if self.engine is not None:
                await self.engine.abort(engine_id)
        except Exception:
            log.exception("abort of %s failed", engine_id)

    def begin_drain(self) -> None:
        self.draining = True
        self._ready_until = 0.0

    async def drain(self, timeout: float) -> None:
        """Stop admitting, wait for in-flight requests up to `timeout`, then abort the rest."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        if self.flights:
            log.info("draining: %d request(s) in flight, up to %.0f s", len(self.flights), timeout)
        while self.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.flights:
            log.warning("drain timeout: aborting %d request(s)", len(self.flights))
            for flight in list(self.flights.values()):
                for engine_id in flight.engine_ids:
                    await self._abort(engine_id)
            end = time.monotonic() + 5.0
            while self.flights and time.monotonic() < end:
                await asyncio.sleep(0.05)
        log.info("drained")

    # --- health ---------------------------------------------------------------------------------------------

    async def healthy(self) -> bool:
        if self.engine is None:
            return False
        try:
            await self.engine.check_health()
        except Exception:
            return False
        return True

    async def ready(self) -> tuple[bool, str]:
        """Ready = not draining and a one-token generation works (success cached for a few seconds)."""
        if self.draining:
            return False, "draining"
        if self.engine is None or self.template is None:
            return False, "engine not started"
        if self.engine.is_dead:
            return False, "engine dead"
        if time.monotonic() < self._ready_until:
            return True, "ok"
        async with self._ready_lock:
            if time.monotonic() < self._ready_until:
                return True, "ok"
            probe_id = f"ready-{uuid.uuid4().hex}"
            prompt = [self.template.bos_id if self.template.bos_id is not None else 0]
            options = SamplingOptions(max_tokens=1, temperature=0.0, stream=False)
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    async for _ in self.engine.generate(prompt, options, probe_id):
                        pass
            except Exception as exc:
                await self._abort(probe_id)
                return False, f"probe generation failed: {type(exc).__name__}: {exc}"
            if self.draining:
                return False, "draining"
            self._ready_until = time.monotonic() + self.settings.readiness_cache_seconds
            return True, "ok"

    # --- shared request handling ---------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model not in (self.model_name, self.settings.model):
            raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")

    async def _encode(self, fn, size: int) -> list[int]:
        if size > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(fn)
        return fn()

    def _budget(self, prompt_len: int, requested: int | None, param: str) -> int:
        """max_tokens for the engine; 400 context_length_exceeded when prompt + completion exceed the context."""
        limit = self.engine.max_model_len
        what = "messages" if param == "messages" else "prompt"
        if requested is None:
            if prompt_len >= limit:
                raise APIError(
                    f"This model's maximum context length is {limit} tokens. However, your {what} resulted in "
                    f"{prompt_len} tokens. Please reduce the length of the {what}.",
                    param=param,
                    code="context_length_exceeded",
                )
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _options(
        self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int, stream_: bool
    ) -> SamplingOptions:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        stop = [s for s in stop if s]
        min_tokens = req.min_tokens or 0
        if min_tokens > max_tokens:
            raise APIError(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
            )
        return SamplingOptions(
            max_tokens=max_tokens,
            n=req.n or 1,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=req.seed,
            stop=stop,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=self._logit_bias(req.logit_bias),
            ignore_eos=bool(req.ignore_eos),
            min_tokens=min_tokens,
            stream=stream_,
        )

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = len(self.template.tokenizer)
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(
                    f"logit_bias keys must be token ids; got {key!r}", param="logit_bias"
                ) from None
            if not 0 <= token < vocab:
                raise APIError(
                    f"logit_bias token id {token} is outside the vocabulary (0..{vocab - 1})",
                    param="logit_bias",
                )
            out[token] = value
        return out

    async def _until_disconnect(self, raw: Request, coro: Awaitable[T]) -> T:
        """Await `coro`; if the client disconnects first, cancel it (aborting its engine request)."""
        task = asyncio.ensure_future(coro)

        async def disconnected() -> None:
            while True:
                message = await raw.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watcher.cancel()
            raise
        if task in done:
            watcher.cancel()
            return task.result()
        task.cancel()
        raise ClientGone()

    async def _run(self, flight: Flight, raw: Request, stream_: bool, build) -> Response:
        """Common tail of chat and completions: prime the engine, then stream or collect; errors -> APIError."""
        streaming_owns_flight = False
        try:
            steps, first_step_stream = build()
            if stream_:
                first = await self._until_disconnect(raw, _first(first_step_stream))
                body = first_step_stream if first is None else _prepend(first, first_step_stream)
                response = steps(body)
                streaming_owns_flight = True
                return response
            return await self._until_disconnect(raw, steps(first_step_stream))
        except ClientGone:
            return Response(status_code=499)
        except EngineRejected as exc:
            raise APIError(str(exc), param=exc.param) from exc
        except EngineDead as exc:
            raise APIError(f"the engine is not available: {exc}", 503, code="engine_unavailable") from exc
        except stream.StreamAborted:
            raise APIError(
                "request aborted: the server is shutting down", 503, code="shutting_down"
            ) from None
        finally:
            if not streaming_owns_flight:
                self._release(flight)

    # --- chat -------------------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        if (
            req.tools
            or req.functions
            or req.function_call not in (None, "none")
            or req.tool_choice not in (None, "none")
        ):
            raise APIError(
                "tools are not supported: this model has no tool-calling format",
                param="tools" if req.tools else "tool_choice",
            )
        messages = normalize_messages(req.messages)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        structured_schema, json_object = _response_format(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        stream_ = bool(req.stream)
        include_usage = bool(stream_ and req.stream_options and req.stream_options.include_usage)

        flight = self._admit("chatcmpl")
        created = int(time.time())
        timer = RequestTimer(self.metrics, "/v1/chat/completions")
        try:
            size = sum(len(m["content"]) for m in messages)
            prompt = await self._encode(lambda: self.template.encode_chat(messages), size)
            options = self._options(req, self._budget(len(prompt), requested, "messages"), stream_)
        except BaseException:
            self._release(flight)
            raise
        options.logprobs = logprobs
        options.json_schema = structured_schema
        options.json_object = json_object
        n = options.n

        def build():
            engine_steps = self.engine.generate(prompt, options, flight.request_id)

            def on_done(p: int, c: int) -> None:
                flight.finished = True
                timer.done(p, c)

            if stream_:

                def respond(body: AsyncIterator[EngineStep]) -> Response:
                    events = stream.chat_events(
                        body,
                        request_id=flight.request_id,
                        model=self.model_name,
                        created=created,
                        n=n,
                        include_usage=include_usage,
                        on_tokens=timer.tokens,
                        on_done=on_done,
                    )
                    return stream.SSEResponse(events, on_close=lambda: self._close(flight))

                return respond, engine_steps

            async def collect(body: AsyncIterator[EngineStep]) -> Response:
                result = await _collect(body, n)
                on_done(result.prompt_tokens, result.completion_tokens)
                return JSONResponse(_chat_body(flight.request_id, created, self.model_name, result))

            return collect, engine_steps

        return await self._run(flight, raw, stream_, build)

    async def _close(self, flight: Flight) -> None:
        self._release(flight)

    # --- completions ------------------------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest, raw: Request) -> Response:
        self._check_model(req.model)
        if req.suffix:
            raise APIError("suffix is not supported", param="suffix")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError(
                f"best_of ({req.best_of}) must equal n ({n}); best-of sampling is not supported",
                param="best_of",
            )
        prompts = _prompt_list(req.prompt)
        stream_ = bool(req.stream)
        include_usage = bool(stream_ and req.stream_options and req.stream_options.include_usage)
        echo = bool(req.echo)

        flight = self._admit("cmpl")
        created = int(time.time())
        timer = RequestTimer(self.metrics, "/v1/completions")
        try:
            encoded: list[list[int]] = []
            for p in prompts:
                if isinstance(p, str):
                    encoded.append(await self._encode(lambda p=p: self.template.encode_text(p), len(p)))
                else:
                    vocab = len(self.template.tokenizer)
                    if any(not 0 <= t < vocab for t in p):
                        raise APIError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
                    encoded.append(list(p))
            budgets = [self._budget(len(ids), req.max_tokens, "prompt") for ids in encoded]
            options = [self._options(req, b, stream_) for b in budgets]
        except BaseException:
            self._release(flight)
            raise
        for o in options:
            o.logprobs = req.logprobs
            o.prompt_logprobs = req.logprobs if (echo and req.logprobs is not None) else None
        texts = [p if isinstance(p, str) else self.template.decode(p) for p in prompts] if echo else None
        if len(encoded) > 1:
            flight.engine_ids = [f"{flight.request_id}-{i}" for i in range(len(encoded))]

        def build():
            gens = [
                self.engine.generate(ids, o, eid)
                for ids, o, eid in zip(encoded, options, flight.engine_ids, strict=True)
            ]
            merged = _merge(gens)

            def on_done(p: int, c: int) -> None:
                flight.finished = True
                timer.done(p, c)

            if stream_:

                def respond(body: AsyncIterator[tuple[int, EngineStep]]) -> Response:
                    echo_info = None
                    if texts is not None:
                        echo_info = [(t, None) for t in texts]
                    events = stream.completion_events(
                        _with_echo_logprobs(body, echo_info),
                        request_id=flight.request_id,
                        model=self.model_name,
                        created=created,
                        n=n,
                        echo=echo_info,
                        include_usage=include_usage,
                        on_tokens=timer.tokens,
                        on_done=on_done,
                    )
                    return stream.SSEResponse(events, on_close=lambda: self._close(flight))

                return respond, merged

            async def collect(body: AsyncIterator[tuple[int, EngineStep]]) -> Response:
                results = await _collect_many(body, len(encoded), n)
                prompt_tokens = sum(r.prompt_tokens for r in results)
                completion_tokens = sum(r.completion_tokens for r in results)
                on_done(prompt_tokens, completion_tokens)
                choices = []
                for p, r in enumerate(results):
                    for i in range(n):
                        text = r.texts[i]
                        lp = None
                        if req.logprobs is not None:
                            tokens: list[TokenLogprob | None] = []
                            if echo:
                                tokens.extend(r.prompt_logprobs or [])
                            tokens.extend(r.logprobs[i] or [])
                            lp, _ = stream.completion_logprobs(tokens, 0)
                        if echo:
                            text = texts[p] + text
                        choices.append(
                            {
                                "index": p * n + i,
                                "text": text,
                                "logprobs": lp,
                                "finish_reason": _finish(r.finish[i]),
                            }
                        )
                body_ = {
                    "id": flight.request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "system_fingerprint": None,
                    "choices": choices,
                    "usage": stream.usage(prompt_tokens, completion_tokens),
                }
                return JSONResponse(body_)

            return collect, merged

        return await self._run(flight, raw, stream_, build)

    # --- models -----------------------------------------------------------------------------------------------

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "created": self.created,
                    "object": "model",
                    "owned_by": "dsv2-serve",
                    "max_model_len": self.engine.max_model_len if self.engine is not None else 0,
                }
            ],
        }


# --- helpers ------------------------------------------------------------------------------------------------


def _response_format(req: ChatCompletionRequest) -> tuple[dict | None, bool]:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None, False
    if rf.type == "json_object":
        return None, True
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise APIError(
            "response_format.json_schema.schema is required for type json_schema",
            param="response_format.json_schema",
        )
    return rf.json_schema.json_schema, False


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    out = list(prompt)
    if any(isinstance(p, list) and not p for p in out):
        raise APIError("prompt token lists must not be empty", param="prompt")
    return out


async def _first(steps: AsyncIterator[T]) -> T | None:
    try:
        return await steps.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


async def _merge(gens: list[AsyncIterator[EngineStep]]) -> AsyncIterator[tuple[int, EngineStep]]:
    """Interleave several prompts' engine streams as (prompt index, step)."""
    if len(gens) == 1:
        async for step in gens[0]:
            yield 0, step
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, gen: AsyncIterator[EngineStep]) -> None:
        try:
            async for step in gen:
                queue.put_nowait((i, step))
            queue.put_nowait((i, end))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(gens)
    try:
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _with_echo_logprobs(steps, echo_info):
    """Fill each prompt's echo logprobs (from the engine's first step) before completion_events reads them."""
    async for p, step in steps:
        if echo_info is not None and step.prompt_logprobs is not None and echo_info[p][1] is None:
            echo_info[p] = (echo_info[p][0], step.prompt_logprobs)
        yield p, step


class _Result:
    __slots__ = ("prompt_tokens", "completion_tokens", "texts", "logprobs", "finish", "prompt_logprobs")

    def __init__(self, n: int) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob] | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, step: EngineStep) -> None:
        self.prompt_tokens = step.prompt_tokens
        if step.prompt_logprobs is not None:
            self.prompt_logprobs = step.prompt_logprobs
        for c in step.choices:
            self._add_choice(c)

    def _add_choice(self, c: ChoiceDelta) -> None:
        if c.finish_reason == "abort":
            raise stream.StreamAborted()
        self.texts[c.index] += c.text
        self.completion_tokens += c.num_tokens
        if c.logprobs is not None:
            if self.logprobs[c.index] is None:
                self.logprobs[c.index] = []
            self.logprobs[c.index].extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish[c.index] = c.finish_reason


async def _collect(steps: AsyncIterator[EngineStep], n: int) -> _Result:
    result = _Result(n)
    async for step in steps:
        result.add(step)
    return result


async def _collect_many(steps: AsyncIterator[tuple[int, EngineStep]], prompts: int, n: int) -> list[_Result]:
    results = [_Result(n) for _ in range(prompts)]
    async for p, step in steps:
        results[p].add(step)
    return results


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _chat_body(request_id: str, created: int, model: str, r: _Result) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.texts[i], "refusal": None},
                "logprobs": stream.chat_logprobs(r.logprobs[i]) if r.logprobs[i] is not None else None,
                "finish_reason": _finish(r.finish[i]),
            }
            for i in range(len(r.texts))
        ],
        "usage": stream.usage(r.prompt_tokens, r.completion_tokens),
    }
