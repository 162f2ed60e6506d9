"""chat() and completion(): one request's life, straight down.

    validate (protocol) → admit (admission) → encode (template) → generate (engine) → render

Each function reads top to bottom and hands the request down; nothing below calls back up. A stream outlives
its handler, so its admission slot is handed to the SSE response (AsyncExitStack.pop_all), which closes it
when the stream ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.gateway import anthropic, protocol, render, responses
from server.gateway.admission import Admission, Slot
from server.gateway.engine import Engine, EngineDead, EngineFailed, RequestAborted, generate_many
from server.gateway.errors import APIError, ClientGone
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.template import ChatTemplate
from server.settings import Settings

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
    limits: protocol.Limits = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.limits = protocol.Limits(
            model_names=(self.model_name, s.model),
            max_model_len=self.engine.max_model_len,
            vocab_size=len(self.template.tokenizer),
            max_sequences=min(s.max_sequences_per_request, s.max_inflight_sequences),
            max_buffered_tokens=s.max_buffered_tokens,
        )


async def chat(svc: Services, req: protocol.ChatCompletionRequest, raw: Request, request_id: str) -> Response:
    limits = svc.limits
    plan = protocol.chat_plan(req, limits)
    timer = RequestTimer(svc.metrics, "/v1/chat/completions")
    with_tools = plan.tool_choice is not None
    async with AsyncExitStack() as owner:
        slot, _, steps = await _start_chat(svc, plan, limits, owner, f"chatcmpl-{request_id}")
        env = render.Envelope(slot.request_id, int(time.time()), svc.model_name)
        if plan.stream:
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = render.chat_events(
                _prepend(first, steps), env, plan.n, plan.include_usage, timer, with_tools
            )
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(_indexed(steps), 1, plan.n, timer))
        return render.chat_body(env, results[0], with_tools)


async def messages(svc: Services, req: anthropic.MessagesRequest, raw: Request, request_id: str) -> Response:
    """Anthropic's Messages API: the chat path, in Anthropic's shapes."""
    limits = svc.limits
    plan = protocol.chat_plan(anthropic.to_chat(req), limits)
    timer = RequestTimer(svc.metrics, "/v1/messages")
    with_tools = plan.tool_choice is not None
    async with AsyncExitStack() as owner:
        _, prompt, steps = await _start_chat(svc, plan, limits, owner, f"msg-{request_id}")
        msg_id = anthropic.message_id()
        if plan.stream:
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = anthropic.message_events(
                _prepend(first, steps), msg_id, svc.model_name, len(prompt), with_tools, timer
            )
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(_indexed(steps), 1, 1, timer))
        return JSONResponse(anthropic.message_body(msg_id, svc.model_name, results[0], with_tools))


async def create_response(
    svc: Services, req: responses.ResponsesRequest, raw: Request, request_id: str
) -> Response:
    """OpenAI's Responses API, stateless: the chat path, in the Response shapes; errors name its parameters."""
    limits = svc.limits
    tr = responses.to_chat(req)
    try:
        plan = protocol.chat_plan(tr.chat, limits)
        timer = RequestTimer(svc.metrics, "/v1/responses")
        with_tools = plan.tool_choice is not None
        async with AsyncExitStack() as owner:
            _, prompt, steps = await _start_chat(svc, plan, limits, owner, f"resp-{request_id}")
            shell = responses.Shell(responses.response_id(), svc.model_name, req, tr)
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


async def count_tokens(svc: Services, req: anthropic.CountTokensRequest) -> dict:
    plan = protocol.chat_plan(anthropic.to_chat(req), svc.limits)
    return {"input_tokens": len(await _encode_chat(svc, plan))}


async def _start_chat(
    svc: Services, plan: protocol.Plan, limits: protocol.Limits, owner: AsyncExitStack, request_id: str
) -> tuple[Slot, list[int], AsyncIterator]:
    """Admit, encode, start generating: the part of a chat request's life every chat-shaped API shares."""
    slot = await owner.enter_async_context(svc.admission.slot(plan.sequences, request_id))
    prompt = await _encode_chat(svc, plan)
    (options,) = protocol.sampling_options(plan, [len(prompt)], limits)
    steps = slot.track(svc.engine.generate(prompt, options, slot.engine_ids[0]), slot.engine_ids[0])
    return slot, prompt, steps


async def _encode_chat(svc: Services, plan: protocol.Plan) -> list[int]:
    size = sum(len(m["content"]) for m in plan.messages)
    return await _encode(lambda messages: svc.template.encode_chat(messages, plan.tools), plan.messages, size)


async def completion(
    svc: Services, req: protocol.CompletionRequest, raw: Request, request_id: str
) -> Response:
    limits = svc.limits
    plan = protocol.completion_plan(req, limits)
    timer = RequestTimer(svc.metrics, "/v1/completions")
    async with AsyncExitStack() as owner:
        slot = await owner.enter_async_context(
            svc.admission.slot(plan.sequences, f"cmpl-{request_id}", engine_requests=len(plan.prompts))
        )
        env = render.Envelope(slot.request_id, int(time.time()), svc.model_name)
        prompts = [
            p if isinstance(p, list) else await _encode(svc.template.encode_text, p, len(p))
            for p in plan.prompts
        ]
        options = protocol.sampling_options(plan, [len(p) for p in prompts], limits)
        steps = slot.track(generate_many(svc.engine, prompts, options, slot.engine_ids))
        echo = (
            [p if isinstance(p, str) else svc.template.decode(p) for p in plan.prompts] if plan.echo else None
        )
        if plan.stream:
            first = await until_disconnected(raw, _first_step(steps, timer))
            events = render.completion_events(
                _prepend(first, steps), env, plan.n, echo, plan.include_usage, timer
            )
            return render.SSEResponse(events, owner.pop_all())
        results = await until_disconnected(raw, render.collect(steps, len(prompts), plan.n, timer))
        return render.completion_body(env, results, echo, req.logprobs is not None)


def models(svc: Services) -> dict:
    return {
        "object": "list",
        "data": [render.model_card(svc.model_name, svc.created, svc.engine.max_model_len)],
    }


def model(svc: Services, model_id: str) -> dict:
    protocol.check_model(model_id, svc.limits)
    return render.model_card(svc.model_name, svc.created, svc.engine.max_model_len)


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
    except (RequestAborted, EngineDead, EngineFailed) as exc:
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
