"""One generation request's life, straight down, for every API (chat, completions, Responses, Messages):

    plan (plans, off the loop for a large body) → caller (key, model, priority, deadline) → admit (admission) → encode (template)
    → account (the key's tokens) → generate (engine) → the one stream loop (stream) → the API's dialect

Each function reads top to bottom and hands the request down; nothing below calls back up. A stream outlives
its handler, so its exit stack (admission slot, token account, trace) is handed to the SSE response
(AsyncExitStack.pop_all), which closes it once the stream is rendered, however it ends (bytes still waiting for a
slow client hold no slot; render.SSEResponse drops a client that takes nothing for --stream-send-timeout).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from server.gateway import anthropic, paths, plans, protocol, render, responses, tracing
from server.gateway.admission import Admission, Slot
from server.gateway.engine import (
    Engine,
    SamplingOptions,
    generate_many,
)
from server.gateway.errors import APIError, ClientGone, DeadlineExceeded
from server.gateway.intake import off_loop
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.ratelimits import Account, RateLimits
from server.gateway.schemas import SchemaLimits
from server.gateway.stream import Answer, Stream, Usage, collect
from server.gateway.template import ChatTemplate
from server.gateway.tenants import ANONYMOUS, Tenant, Tenants
from server.settings import Settings, adapter_dir_problem

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

T = TypeVar("T")


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
    ratelimits: RateLimits | None = None  # the keys' tokens per minute; default: the admission's
    limits: plans.Limits = field(init=False)
    adapters_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time

    def __post_init__(self) -> None:
        s = self.settings
        self.ratelimits = self.ratelimits or self.admission.ratelimits
        self.limits = plans.Limits(
            base_names=s.base_model_names,
            adapters=self.engine.adapters,
            max_model_len=self.engine.max_model_len,
            vocab_size=len(self.template.tokenizer),
            max_sequences=min(s.max_sequences_per_request, s.max_inflight_sequences),
            max_buffered_tokens=s.max_buffered_tokens,
            schemas=SchemaLimits(
                nodes=s.max_schema_nodes,
                depth=s.max_schema_depth,
                properties=s.max_schema_properties,
                enum_values=s.max_schema_enum_values,
                branches=s.max_schema_branches,
                optional_properties=s.max_schema_optional_properties,
                pattern_repeat=s.max_schema_pattern_repeat,
            ),
            max_stop_sequences=s.max_stop_sequences,
            max_stop_length=s.max_stop_length,
            max_tools=s.max_tools,
            max_tool_description_length=s.max_tool_description_length,
            force_include_usage=s.force_include_usage,
        )


async def chat(svc: Services, req: protocol.ChatCompletionRequest, raw: Request, request_id: str) -> Response:
    plan = await off_loop(raw, plans.chat_plan, req, svc.limits)
    return await _serve(svc, raw, request_id, plan, req.model, req.priority, _Chat(plan))


async def messages(svc: Services, req: anthropic.MessagesRequest, raw: Request, request_id: str) -> Response:
    """Anthropic's Messages API: the chat flow, in Anthropic's shapes; errors name its parameters."""
    try:
        plan = await off_loop(raw, _anthropic_plan, req, svc.limits)
        return await _serve(svc, raw, request_id, plan, req.model, None, _Messages())
    except APIError as exc:
        raise anthropic.renamed(exc) from None


async def create_response(
    svc: Services, req: responses.ResponsesRequest, raw: Request, request_id: str
) -> Response:
    """OpenAI's Responses API, stateless: the chat flow, in the Response shapes; errors name its parameters."""
    tr = await off_loop(raw, responses.to_chat, req)
    try:
        plan = await off_loop(raw, plans.chat_plan, tr.chat, svc.limits)
        return await _serve(svc, raw, request_id, plan, req.model, req.priority, _Responses(req, tr))
    except APIError as exc:
        raise responses.renamed(exc, tr.source) from None


async def completion(
    svc: Services, req: protocol.CompletionRequest, raw: Request, request_id: str
) -> Response:
    plan, echo = await off_loop(raw, _completion_plan, svc, req)
    return await _serve(svc, raw, request_id, plan, req.model, req.priority, _Completions(plan, echo, req))


async def count_tokens(svc: Services, req: anthropic.CountTokensRequest, raw: Request) -> dict:
    """The prompt's tokens, as a Messages request would take them; the key may count only for its models."""
    try:
        plan = await off_loop(raw, _anthropic_plan, req, svc.limits)
    except APIError as exc:
        raise anthropic.renamed(exc) from None
    caller = _caller(svc, raw, req.model, None)
    charged = not caller.batch or svc.settings.batch_counts_toward_limits
    await svc.ratelimits.admit(caller.tenant, caller.account, charged=charged)  # one of its requests a minute
    return {"input_tokens": len(await off_loop(raw, _encode_chat, svc, plan))}


def _anthropic_plan(
    req: anthropic.MessagesRequest | anthropic.CountTokensRequest, limits: plans.Limits
) -> plans.Plan:
    return plans.chat_plan(anthropic.to_chat(req), limits)


def _completion_plan(svc: Services, req: protocol.CompletionRequest) -> tuple[plans.Plan, list[str] | None]:
    plan = plans.completion_plan(req, svc.limits)
    echo = [p if isinstance(p, str) else svc.template.decode(p) for p in plan.prompts] if plan.echo else None
    return plan, echo


async def _serve(
    svc: Services,
    raw: Request,
    request_id: str,
    plan: plans.Plan,
    model: str,
    priority: int | None,
    dialect: _Dialect,
) -> Response:
    """One generation request's life, for every API: caller → admit → encode → the key's limits → generate → the
    one stream loop (stream.py) → the API's dialect formats it, as a stream or a body."""
    caller = _caller(svc, raw, model, priority)
    timer = RequestTimer(svc.metrics, dialect.route, latency=not caller.batch)
    async with AsyncExitStack() as owner:
        owner.callback(timer.flush)  # the inter-token latencies it gathered, however the request ends
        trace = _trace(svc, raw, caller, timer, owner, request_id)
        with trace.phase("admission"):
            slot = await owner.enter_async_context(
                svc.admission.slot(
                    plan.sequences,
                    dialect.prefix + request_id,
                    engine_requests=len(plan.prompts) or 1,
                    tenant=caller.tenant,
                    batch=caller.batch,
                )
            )
        with trace.phase("template"):
            prompts = await off_loop(raw, _encode_plan, svc, plan)
        options = caller.apply(plans.sampling_options(plan, [len(p) for p in prompts], svc.limits))
        usage = await _admit_key(svc, caller, owner, slot, Usage(sum(len(p) for p in prompts)), options)
        steps = caller.within(generate_many(svc.engine, prompts, options, slot.engine_ids))
        stream = Stream(
            steps, plan.n, usage, timer, trace, slot, plan.tool_choice is not None, not plan.stream
        )
        if plan.stream:
            await until_disconnected(raw, stream.start())  # a failure before the first token is a plain error
            events = dialect.events(stream, slot.request_id, caller.model)
            return render.SSEResponse(events, owner.pop_all(), svc.settings.stream_send_timeout)
        answers = await until_disconnected(raw, collect(stream, len(prompts) * plan.n))
        return dialect.body(stream, answers, slot.request_id, caller.model)


def _encode_plan(svc: Services, plan: plans.Plan) -> list[list[int]]:
    if not plan.prompts:  # chat
        return [_encode_chat(svc, plan)]
    return [p if isinstance(p, list) else svc.template.encode_text(p) for p in plan.prompts]


def _encode_chat(svc: Services, plan: plans.Plan) -> list[int]:
    return svc.template.encode_chat(plan.messages, plan.tools, plan.generation_prompt, plan.continue_final)


# --- dialects: what each API adds to the flow (its route, its id prefix, its stream, its body) ----------------------


class _Dialect(Protocol):
    route: str
    prefix: str

    def events(self, stream: Stream, response_id: str, model: str) -> AsyncIterator[bytes]: ...

    def body(self, stream: Stream, answers: list[Answer], response_id: str, model: str) -> Response: ...


class _Chat:
    route, prefix = paths.CHAT, "chatcmpl-"

    def __init__(self, plan: plans.Plan) -> None:
        self.plan = plan

    def events(self, stream: Stream, response_id: str, model: str) -> AsyncIterator[bytes]:
        env, p = render.Envelope(response_id, int(time.time()), model), self.plan
        return render.chat_events(stream, env, p.n, p.include_usage, p.continuous_usage)

    def body(self, stream: Stream, answers: list[Answer], response_id: str, model: str) -> Response:
        return render.chat_body(render.Envelope(response_id, int(time.time()), model), answers, stream.usage)


class _Completions:
    route, prefix = paths.COMPLETIONS, "cmpl-"

    def __init__(self, plan: plans.Plan, echo: list[str] | None, req: protocol.CompletionRequest) -> None:
        self.plan, self.echo, self.logprobs = plan, echo, req.logprobs is not None

    def events(self, stream: Stream, response_id: str, model: str) -> AsyncIterator[bytes]:
        env, p = render.Envelope(response_id, int(time.time()), model), self.plan
        return render.completion_events(stream, env, p.n, self.echo, p.include_usage, p.continuous_usage)

    def body(self, stream: Stream, answers: list[Answer], response_id: str, model: str) -> Response:
        env = render.Envelope(response_id, int(time.time()), model)
        return render.completion_body(
            env, answers, stream.usage, self.plan.n, self.echo, self.logprobs, stream.prompt_logprobs
        )


class _Responses:
    route, prefix = paths.RESPONSES, "resp_"

    def __init__(self, req: responses.ResponsesRequest, tr: responses.Translation) -> None:
        self.req, self.tr = req, tr

    def events(self, stream: Stream, response_id: str, model: str) -> AsyncIterator[bytes]:
        return responses.response_events(stream, responses.Shell(response_id, model, self.req, self.tr))

    def body(self, stream: Stream, answers: list[Answer], response_id: str, model: str) -> Response:
        shell = responses.Shell(response_id, model, self.req, self.tr)
        return JSONResponse(responses.response_body(shell, answers[0], stream.usage))


class _Messages:
    route, prefix = paths.MESSAGES, "msg_"

    def events(self, stream: Stream, response_id: str, model: str) -> AsyncIterator[bytes]:
        return anthropic.message_events(stream, response_id, model)

    def body(self, stream: Stream, answers: list[Answer], response_id: str, model: str) -> Response:
        return JSONResponse(anthropic.message_body(response_id, model, answers[0], stream.usage))


def models(svc: Services) -> dict:
    """The base model's listed names, then each LoRA adapter with the base model as its `parent`."""
    names = (svc.model_name, *svc.settings.model_aliases, *svc.engine.adapters)
    return {"object": "list", "data": [_card(svc, name) for name in names]}


def model(svc: Services, model_id: str) -> dict:
    plans.check_model(model_id, svc.limits)
    return _card(svc, model_id)


async def load_adapter(svc: Services, req: protocol.LoadAdapterRequest, raw: Request) -> Response:
    """vLLM's runtime LoRA API, for admin keys: load an adapter from inside --lora-adapter-dirs (or a hub repo
    id, with --allow-lora-hub-ids) into the engine, then serve it under its name."""
    _check_admin(svc, raw)
    name = req.lora_name
    if name in svc.settings.base_model_names:
        raise APIError(f"the adapter name {name!r} is a name of the base model", param="lora_name")
    path = _runtime_lora_path(svc.settings, req.lora_path)
    if problem := adapter_dir_problem(path):
        raise APIError(problem, param="lora_path")
    async with svc.adapters_lock:
        if name in svc.engine.adapters:
            raise APIError(f"the LoRA adapter {name!r} is already loaded; unload it first", param="lora_name")
        cap = svc.settings.max_runtime_adapters
        if name not in svc.settings.adapters and _runtime_adapters(svc) >= cap:
            raise APIError(
                f"{cap} LoRA adapters loaded at run time already, the most --max-runtime-adapters allows; "
                "unload one first",
                code="too_many_adapters",
            )
        await svc.engine.load_adapter(name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(svc: Services, req: protocol.UnloadAdapterRequest, raw: Request) -> Response:
    _check_admin(svc, raw)
    name = req.lora_name
    async with svc.adapters_lock:
        if name not in svc.engine.adapters:
            raise APIError(
                f"no LoRA adapter named {name!r} is loaded", 404, param="lora_name", code="model_not_found"
            )
        await svc.engine.unload_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _check_admin(svc: Services, raw: Request) -> None:
    """On a server with keys, only keys with `admin: true` may change the adapters every key uses."""
    tenant: Tenant = getattr(raw.state, "tenant", ANONYMOUS)
    if svc.tenants.enabled and not tenant.admin:
        raise APIError(
            f"key {tenant.name!r} may not load or unload LoRA adapters: that needs a key with `admin: true` "
            "in --api-key-file",
            403,
            code="admin_key_required",
        )


def _runtime_lora_path(settings: Settings, path: str) -> str:
    """What the engine may load for a runtime `lora_path`: its real path (symlinks and `..` resolved, so
    nothing escapes) when that lies in one of --lora-adapter-dirs; a hub repo id as given with
    --allow-lora-hub-ids. Anything else is a 400 naming lora_path. A path is local as adapter_dir_problem and
    vLLM take it: it exists, or starts with /, . or ~."""
    if "\0" in path:  # no file name holds one (os calls raise ValueError)
        raise APIError("lora_path holds a NUL character", param="lora_path")
    where = Path(path).expanduser()
    if not (where.exists() or path.startswith(("/", ".", "~"))):
        if not settings.allow_lora_hub_ids:
            raise APIError(
                f"lora_path {path!r} is not a local directory; loading adapters from the Hugging Face hub "
                "needs the server flag --allow-lora-hub-ids",
                param="lora_path",
            )
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(path)
        except HFValidationError:
            raise APIError(
                f"lora_path {path!r} is neither a local directory nor a repo id", param="lora_path"
            ) from None
        return path
    real = os.path.realpath(where)
    for allowed in settings.lora_adapter_dirs:
        top = os.path.realpath(Path(allowed).expanduser())
        if os.path.commonpath([real, top]) == top:
            return real
    if not settings.lora_adapter_dirs:
        raise APIError(
            "no local lora_path may be loaded at run time: the server has no --lora-adapter-dirs",
            param="lora_path",
        )
    raise APIError(
        f"lora_path {path!r} is outside the directories the server allows (--lora-adapter-dirs)",
        param="lora_path",
    )


def _runtime_adapters(svc: Services) -> int:
    """Adapters loaded now through the runtime API: every name but --lora-modules' (the --max-runtime-adapters
    count)."""
    started = svc.settings.adapters
    return sum(1 for name in svc.engine.adapters if name not in started)


def _card(svc: Services, name: str) -> dict:
    """A listed name's card. `root` is a name, never a path: the base model's name for it and its aliases, the
    adapter's own name for an adapter."""
    if name in svc.engine.adapters:
        return render.model_card(name, svc.created, svc.engine.max_model_len, name, svc.model_name)
    return render.model_card(name, svc.created, svc.engine.max_model_len, svc.model_name, None)


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
    batch: bool = False  # a line of a batch (server.batch.worker): the batch cap, --batch-priority
    start: float = field(default_factory=time.monotonic)
    account: Account = field(default_factory=Account)  # with its key's limits: its x-ratelimit-* headers

    def apply(self, options: list[SamplingOptions]) -> list[SamplingOptions]:
        for o in options:
            o.priority = self.priority
            o.cache_salt = self.cache_salt
            o.adapter = self.adapter
        return options

    def within(self, steps: AsyncIterator[T]) -> AsyncIterator[T]:
        return steps if self.timeout is None else _within(steps, self.start + self.timeout, self.timeout)


async def _admit_key(
    svc: Services,
    caller: Caller,
    owner: AsyncExitStack,
    slot: Slot,
    usage: Usage,
    options: list[SamplingOptions],
) -> Usage:
    """The request against every limit of its key, in one check (one round trip with --rate-limit-store): one of
    its requests per minute, its sequences among the key's max_sequences (held by its slot, released with it),
    and its worst case (prompt + n x max_tokens) reserved from its tokens per minute, settled when the request
    ends, however it ends (completed, failed, past its deadline, aborted by a drain, or left by its client):
    charged the prompt and what was generated (`usage`, which the stream loop counts), the rest given back."""
    # Batch lines are the cheap lane: in the key's usage metrics always, in its requests and tokens per minute
    # only with --batch-counts-toward-limits; their sequences always count.
    charged = not caller.batch or svc.settings.batch_counts_toward_limits
    worst = usage.prompt_tokens + sum(o.n * o.max_tokens for o in options)
    limits = svc.ratelimits
    admitted = await limits.admit(
        caller.tenant, caller.account, tokens=worst, sequences=slot.cost, charged=charged
    )
    slot.lease = admitted.lease
    owner.push_async_callback(_settle, svc.metrics, limits, caller, admitted.reserved, usage)
    return usage


async def _settle(
    metrics: GatewayMetrics, limits: RateLimits, caller: Caller, reserved: int | None, usage: Usage
) -> None:
    tenant = caller.tenant
    metrics.key_requests.labels(tenant.name).inc()
    metrics.key_prompt_tokens.labels(tenant.name).inc(usage.prompt_tokens)
    metrics.key_generation_tokens.labels(tenant.name).inc(usage.completion_tokens)
    used = usage.prompt_tokens + usage.completion_tokens
    await limits.settle_tokens(tenant, reserved, used, caller.account)


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
    owner.push(trace)
    return trace


def _caller(svc: Services, raw: Request, model: str, priority: int | None) -> Caller:
    tenant: Tenant = getattr(raw.state, "tenant", ANONYMOUS)
    adapter = model if model in svc.engine.adapters else None
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
    batch = getattr(raw.state, "batch", False)
    if batch and svc.engine.priority_scheduling:  # the spare-capacity lane: never more urgent than the flag
        chosen = max(chosen, svc.settings.batch_priority)
    salt = tenant.cache_salt if svc.tenants.enabled and svc.settings.cache_isolation else None
    account = getattr(raw.state, "ratelimits", None) or Account()
    return Caller(tenant, model, adapter, chosen, salt, _timeout(svc, raw), batch, account=account)


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
