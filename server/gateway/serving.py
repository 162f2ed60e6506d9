"""chat() and completion(): one request's life, straight down.

    validate (protocol) → admit (admission) → encode (template) → generate (engine) → render

Each function reads top to bottom and hands the request down; nothing below calls back up. A stream outlives
its handler, so its admission slot is handed to the SSE response (AsyncExitStack.pop_all), which closes it
when the stream ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.gateway import anthropic, paths, protocol, render, responses, tracing
from server.gateway.admission import Admission, Slot
from server.gateway.engine import (
    Engine,
    EngineDead,
    EngineFailed,
    RequestAborted,
    SamplingOptions,
    generate_many,
)
from server.gateway.errors import APIError, ClientGone, DeadlineExceeded
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.template import ChatTemplate
from server.gateway.tenants import ANONYMOUS, Tenant, Tenants
from server.settings import Settings, adapter_dir_problem

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

T = TypeVar("T")

# Prompts longer than this (characters) are tokenised off the event loop.
INLINE_TOKENIZE_CHARS = 8192


@dataclass
class Services:
    """What serving uses, built once by the app's lifespan (after the engine has started)."""

    settings: Settings
    engine: Engine
    template: ChatTemplate
    admission: Admission
    metrics: GatewayMetrics
    model_name: str
    created: int
    tenants: Tenants = field(default_factory=lambda: Tenants([]))
    tracer: Tracer | None = None
    limits: protocol.Limits = field(init=False)
    # LoRA adapter name -> path: --lora-modules, then those loaded at run time (one load or unload at a time)
    adapters: dict[str, str] = field(init=False)
    adapters_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        s = self.settings
        self.adapters = dict(s.adapters)
        self.limits = protocol.Limits(
            model_names=self._model_names(),
            max_model_len=self.engine.max_model_len,
            vocab_size=len(self.template.tokenizer),
            max_sequences=min(s.max_sequences_per_request, s.max_inflight_sequences),
            max_buffered_tokens=s.max_buffered_tokens,
            force_include_usage=s.force_include_usage,
        )

    def _model_names(self) -> tuple[str, ...]:
        return (*self.settings.base_model_names, *self.adapters)

    def set_adapter(self, name: str, path: str | None) -> None:
        """Add (path) or remove (None) a LoRA adapter; requests already admitted keep theirs."""
        if path is None:
            self.adapters.pop(name)
        else:
            self.adapters[name] = path
        self.limits = dataclasses.replace(self.limits, model_names=self._model_names())


async def chat(svc: Services, req: protocol.ChatCompletionRequest, raw: Request, request_id: str) -> Response:
    limits = svc.limits
    plan = protocol.chat_plan(req, limits)
    caller = _caller(svc, raw, req.model, req.priority)
    timer = RequestTimer(svc.metrics, paths.CHAT)
    with_tools = plan.tool_choice is not None
    async with AsyncExitStack() as owner:
        _trace(svc, raw, caller, timer, owner, request_id)
        slot, prompt, steps = await _start_chat(svc, plan, caller, owner, f"chatcmpl-{request_id}", timer)
        env = render.Envelope(slot.request_id, int(time.time()), caller.model)
        if plan.stream:
            counted = render.TokenCount() if plan.continuous_usage else None
            steps = counted.count(steps) if counted else steps
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = render.chat_events(
                _prepend(first, steps), env, plan.n, plan.include_usage, timer, with_tools
            )
            if counted:
                events = render.with_running_usage(events, counted, timer, len(prompt))
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(_indexed(steps), 1, plan.n, timer))
        return render.chat_body(env, results[0], with_tools)


async def messages(svc: Services, req: anthropic.MessagesRequest, raw: Request, request_id: str) -> Response:
    """Anthropic's Messages API: the chat path, in Anthropic's shapes."""
    limits = svc.limits
    plan = protocol.chat_plan(anthropic.to_chat(req), limits)
    caller = _caller(svc, raw, req.model, None)
    timer = RequestTimer(svc.metrics, paths.MESSAGES)
    with_tools = plan.tool_choice is not None
    async with AsyncExitStack() as owner:
        _trace(svc, raw, caller, timer, owner, request_id)
        slot, prompt, steps = await _start_chat(svc, plan, caller, owner, f"msg_{request_id}", timer)
        msg_id = slot.request_id
        if plan.stream:
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = anthropic.message_events(
                _prepend(first, steps), msg_id, caller.model, len(prompt), with_tools, timer
            )
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(_indexed(steps), 1, 1, timer))
        return JSONResponse(anthropic.message_body(msg_id, caller.model, results[0], with_tools))


async def create_response(
    svc: Services, req: responses.ResponsesRequest, raw: Request, request_id: str
) -> Response:
    """OpenAI's Responses API, stateless: the chat path, in the Response shapes; errors name its parameters."""
    limits = svc.limits
    tr = responses.to_chat(req)
    try:
        plan = protocol.chat_plan(tr.chat, limits)
        caller = _caller(svc, raw, req.model, req.priority)
        timer = RequestTimer(svc.metrics, paths.RESPONSES)
        with_tools = plan.tool_choice is not None
        async with AsyncExitStack() as owner:
            _trace(svc, raw, caller, timer, owner, request_id)
            slot, prompt, steps = await _start_chat(svc, plan, caller, owner, f"resp_{request_id}", timer)
            shell = responses.Shell(slot.request_id, caller.model, req, tr)
            if plan.stream:
                first = await until_disconnected(raw, _first_step(steps, timer))
                events = responses.response_events(
                    _prepend(first, steps), shell, len(prompt), with_tools, timer
                )
                return render.SSEResponse(events, owner.pop_all())
            results = await until_disconnected(raw, render.collect(_indexed(steps), 1, 1, timer))
            return JSONResponse(responses.response_body(shell, results[0], with_tools))
    except APIError as exc:
        raise responses.renamed(exc, tr.source) from None


async def count_tokens(svc: Services, req: anthropic.CountTokensRequest, raw: Request) -> dict:
    """The prompt's tokens, as a Messages request would take them; the key may count only for its models."""
    plan = protocol.chat_plan(anthropic.to_chat(req), svc.limits)
    _caller(svc, raw, req.model, None)
    return {"input_tokens": len(await _encode_chat(svc, plan))}


async def _start_chat(
    svc: Services,
    plan: protocol.Plan,
    caller: Caller,
    owner: AsyncExitStack,
    request_id: str,
    timer: RequestTimer,
) -> tuple[Slot, list[int], AsyncIterator]:
    """Admit, encode, start generating: the part of a chat request's life every chat-shaped API shares."""
    trace = timer.trace
    with trace.phase("admission"):
        slot = await owner.enter_async_context(
            svc.admission.slot(plan.sequences, request_id, tenant=caller.tenant, timer=timer)
        )
    with trace.phase("template"):
        prompt = await _encode_chat(svc, plan)
    (options,) = caller.apply(protocol.sampling_options(plan, [len(prompt)], svc.limits))
    _reserve_tokens(svc, caller, owner, slot, len(prompt), [options])
    engine_id = slot.engine_ids[0]
    steps = slot.track(caller.within(svc.engine.generate(prompt, options, engine_id)), engine_id)
    return slot, prompt, steps


async def _encode_chat(svc: Services, plan: protocol.Plan) -> list[int]:
    size = sum(len(m["content"]) for m in plan.messages)
    return await _encode(lambda messages: svc.template.encode_chat(messages, plan.tools), plan.messages, size)


async def completion(
    svc: Services, req: protocol.CompletionRequest, raw: Request, request_id: str
) -> Response:
    limits = svc.limits
    plan = protocol.completion_plan(req, limits)
    caller = _caller(svc, raw, req.model, req.priority)
    timer = RequestTimer(svc.metrics, paths.COMPLETIONS)
    async with AsyncExitStack() as owner:
        trace = _trace(svc, raw, caller, timer, owner, request_id)
        with trace.phase("admission"):
            slot = await owner.enter_async_context(
                svc.admission.slot(
                    plan.sequences,
                    f"cmpl-{request_id}",
                    engine_requests=len(plan.prompts),
                    tenant=caller.tenant,
                    timer=timer,
                )
            )
        env = render.Envelope(slot.request_id, int(time.time()), caller.model)
        with trace.phase("template"):
            prompts = [
                p if isinstance(p, list) else await _encode(svc.template.encode_text, p, len(p))
                for p in plan.prompts
            ]
        options = caller.apply(protocol.sampling_options(plan, [len(p) for p in prompts], limits))
        _reserve_tokens(svc, caller, owner, slot, sum(len(p) for p in prompts), options)
        steps = slot.track(caller.within(generate_many(svc.engine, prompts, options, slot.engine_ids)))
        echo = (
            [p if isinstance(p, str) else svc.template.decode(p) for p in plan.prompts] if plan.echo else None
        )
        if plan.stream:
            counted = render.TokenCount() if plan.continuous_usage else None
            steps = counted.count(steps) if counted else steps
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = render.completion_events(
                _prepend(first, steps), env, plan.n, echo, plan.include_usage, timer
            )
            if counted:
                events = render.with_running_usage(events, counted, timer, sum(len(p) for p in prompts))
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(steps, len(prompts), plan.n, timer))
        return render.completion_body(env, results, echo, req.logprobs is not None)


def models(svc: Services) -> dict:
    """The base model's listed names, then each LoRA adapter with the base model as its `parent`."""
    names = (svc.model_name, *svc.settings.model_aliases, *svc.adapters)
    return {"object": "list", "data": [_card(svc, name) for name in names]}


def model(svc: Services, model_id: str) -> dict:
    protocol.check_model(model_id, svc.limits)
    return _card(svc, model_id)


async def load_adapter(svc: Services, req: protocol.LoadAdapterRequest) -> Response:
    """vLLM's runtime LoRA API: load an adapter into the engine, then serve it under its name."""
    name, path = req.lora_name, req.lora_path
    if name in svc.settings.base_model_names:
        raise APIError(f"the adapter name {name!r} is a name of the base model", param="lora_name")
    if problem := adapter_dir_problem(path):
        raise APIError(problem, param="lora_path")
    async with svc.adapters_lock:
        if name in svc.adapters:
            raise APIError(f"the LoRA adapter {name!r} is already loaded; unload it first", param="lora_name")
        await svc.engine.load_adapter(name, os.path.expanduser(path))
        svc.set_adapter(name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(svc: Services, req: protocol.UnloadAdapterRequest) -> Response:
    name = req.lora_name
    async with svc.adapters_lock:
        if name not in svc.adapters:
            raise APIError(
                f"no LoRA adapter named {name!r} is loaded", 404, param="lora_name", code="model_not_found"
            )
        svc.set_adapter(name, None)
        await svc.engine.unload_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _card(svc: Services, name: str) -> dict:
    adapter = svc.adapters.get(name)
    root, parent = (adapter, svc.model_name) if adapter is not None else (svc.settings.model, None)
    return render.model_card(name, svc.created, svc.engine.max_model_len, root, parent)


# --- who is asking: key, model name, priority, cache salt, deadline ---------------------------------------------


@dataclass
class Caller:
    """What a request's key and headers decide about it, once, before admission."""

    tenant: Tenant
    model: str  # the name the client asked for: responses report it
    adapter: str | None  # the LoRA adapter that name selects, if it names one
    priority: int
    cache_salt: str | None
    timeout: float | None  # seconds, from arrival
    start: float = field(default_factory=time.monotonic)

    def apply(self, options: list[SamplingOptions]) -> list[SamplingOptions]:
        for o in options:
            o.priority = self.priority
            o.cache_salt = self.cache_salt
            o.adapter = self.adapter
        return options

    def within(self, steps: AsyncIterator[T]) -> AsyncIterator[T]:
        return steps if self.timeout is None else _within(steps, self.start + self.timeout, self.timeout)


def _reserve_tokens(
    svc: Services,
    caller: Caller,
    owner: AsyncExitStack,
    slot: Slot,
    prompt_tokens: int,
    options: list[SamplingOptions],
) -> None:
    """The key's account: its worst case (prompt + n x max_tokens) is reserved from its tokens per minute now,
    and settled when the request ends, however it ends (completed, failed, past its deadline, aborted by a
    drain, or left by its client): charged the prompt and what was generated, the rest given back."""
    tenant = caller.tenant
    worst = prompt_tokens + sum(o.n * o.max_tokens for o in options)
    try:
        reserved = tenant.reserve_tokens(worst, "max_tokens")
    except APIError:
        svc.metrics.key_rate_limited.labels(tenant.name).inc()
        raise
    owner.callback(_settle, svc.metrics, tenant, reserved, prompt_tokens, slot)


def _settle(metrics: GatewayMetrics, tenant: Tenant, reserved: int, prompt_tokens: int, slot: Slot) -> None:
    tenant.settle_tokens(reserved, prompt_tokens + slot.generated)
    metrics.key_requests.labels(tenant.name).inc()
    metrics.key_prompt_tokens.labels(tenant.name).inc(prompt_tokens)
    metrics.key_generation_tokens.labels(tenant.name).inc(slot.generated)


def _trace(
    svc: Services, raw: Request, caller: Caller, timer: RequestTimer, owner: AsyncExitStack, request_id: str
) -> tracing.RequestTrace:
    """The request's span (a child of its traceparent), ended with its response or stream."""
    trace = tracing.RequestTrace(
        svc.tracer,
        f"POST {timer.route}",
        raw.headers,
        {
            "dsv2.request_id": request_id,
            "dsv2.key": caller.tenant.name,
            "gen_ai.request.model": caller.model,
            "http.route": timer.route,
        },
    )
    timer.trace = trace
    owner.push(trace)
    return trace


def _caller(svc: Services, raw: Request, model: str, priority: int | None) -> Caller:
    tenant: Tenant = getattr(raw.state, "tenant", ANONYMOUS)
    adapter = model if model in svc.adapters else None
    # An alias of the base model is the base model to a key's model list; an adapter is only itself.
    if not (tenant.may_use(model) if adapter else tenant.may_use(model, svc.model_name)):
        raise APIError(
            f"key {tenant.name!r} may not use the model `{model}`",
            403,
            param="model",
            code="model_not_allowed",
        )
    chosen = tenant.check_priority(priority)
    if not svc.engine.priority_scheduling:
        if priority:  # asked for explicitly; a key's default only applies where the engine orders by priority
            raise APIError(
                "priority needs the engine's priority scheduling: start the server with --scheduling-policy "
                "priority",
                param="priority",
            )
        chosen = 0
    salt = tenant.cache_salt if svc.tenants.enabled and svc.settings.cache_isolation else None
    return Caller(tenant, model, adapter, chosen, salt, _timeout(svc, raw))


def _timeout(svc: Services, raw: Request) -> float | None:
    """The request's deadline in seconds: --max-request-seconds, or less if X-Request-Timeout asks for it."""
    limit = svc.settings.max_request_seconds
    header = raw.headers.get("x-request-timeout")
    if header is None:
        return limit
    try:
        asked = float(header)
    except ValueError:
        asked = math.nan
    if not (math.isfinite(asked) and asked > 0):
        raise APIError(
            f"X-Request-Timeout must be a positive number of seconds; got {header!r}",
            param="X-Request-Timeout",
        )
    return asked if limit is None else min(asked, limit)


async def _within(steps: AsyncIterator[T], deadline: float, seconds: float) -> AsyncIterator[T]:
    """Pass `steps` through until the monotonic `deadline`; then DeadlineExceeded (the slot aborts the engine
    request)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(seconds)
        try:
            async with asyncio.timeout(remaining):
                step = await anext(steps)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(seconds) from None
        yield step


# --- helpers --------------------------------------------------------------------------------------------------


async def until_disconnected(raw: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone (the slot then aborts)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

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


async def _encode(encode: Callable[[T], list[int]], value: T, size: int) -> list[int]:
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(encode, value)
    return encode(value)


async def _first_step(steps: AsyncIterator[T], timer: RequestTimer) -> T | None:
    """The engine's first step, before any header is sent: a rejection or failure here is a plain HTTP error."""
    try:
        return await anext(steps)
    except StopAsyncIteration:
        return None
    except (RequestAborted, EngineDead, EngineFailed, DeadlineExceeded) as exc:
        raise render.failure(exc, timer) from exc


async def _prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item


async def _indexed(steps: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    async for step in steps:
        yield 0, step
