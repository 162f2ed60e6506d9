"""A request -> its plan: the one place the 400s of a valid-looking request are decided.

`chat_plan` / `completion_plan` check what the request alone decides (model, parameters that conflict, its cost
in sequences) before it is admitted; `sampling_options` decides what needs the prompt's length (the context
budget, the memory a buffered result may take) once it is tokenised. All are pure functions of the request and
the server's `Limits`. (Schema checks, the template's and the engine's own refusals are theirs.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from server.gateway.engine import SamplingOptions
from server.gateway.errors import APIError
from server.gateway.protocol import ChatCompletionRequest, CompletionRequest, Tool
from server.gateway.schemas import SchemaBudget, SchemaLimits
from server.gateway.template import normalize_messages
from server.gateway.tools import json_tag, structural_tag


@dataclass(frozen=True)
class Limits:
    """What the server allows; the pure functions below decide every 400 against it."""

    base_names: tuple[str, ...]  # the base model's names (served name and aliases)
    adapters: Mapping[str, str]  # the engine's LoRA adapters (name -> path), read live: names of their own
    max_model_len: int
    vocab_size: int
    max_sequences: int  # per request: min(--max-sequences-per-request, --max-inflight-sequences)
    max_buffered_tokens: int
    schemas: SchemaLimits  # the JSON schemas (tool parameters, response format) one request may carry
    max_stop_sequences: int = 16
    max_stop_length: int = 256  # characters
    max_tools: int = 128
    max_tool_description_length: int = 16384  # characters
    force_include_usage: bool = False  # every stream ends with usage, whatever the request asks


@dataclass
class Plan:
    """A validated request, before tokenisation: what to encode, what it costs, how to answer."""

    sequences: int  # its cost for admission: prompts x n
    stream: bool
    include_usage: bool
    continuous_usage: bool  # every chunk carries the usage so far
    n: int
    requested_tokens: int | None  # max_tokens as asked; None = what is left of the context
    buffered_per_token: int  # token entries a buffered result keeps per generated token (1 + top logprobs)
    param: str  # "messages" or "prompt": the parameter named by context-length errors
    options: SamplingOptions  # everything but max_tokens
    messages: list[dict] = field(default_factory=list)  # chat
    tools: list[dict] = field(default_factory=list)  # {"name", "description", "parameters"} for the template
    tool_choice: str | None = None  # None (no tool calls), "auto", "required" or a function name
    generation_prompt: bool = True  # chat: the prompt ends with the assistant's turn opened
    continue_final: bool = False  # chat: the prompt ends inside the last (assistant) message
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    echo: bool = False


def chat_plan(req: ChatCompletionRequest, limits: Limits) -> Plan:
    check_model(req.model, limits)
    if req.functions is not None or req.function_call is not None:
        raise APIError(
            "functions and function_call are deprecated by OpenAI and not supported; use tools and tool_choice",
            param="functions" if req.functions is not None else "function_call",
        )
    _check_stream_options(req)
    if req.top_logprobs and not req.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    n = req.n or 1
    _check_sequences(n, "n", limits)
    budget = SchemaBudget(limits.schemas)
    tools = _tools(req.tools, budget, limits)
    choice = _tool_choice(req, tools)
    messages = normalize_messages(req.messages)
    _check_continuation(req, messages)
    options = _options(req, n, limits)
    options.logprobs = (req.top_logprobs or 0) if req.logprobs else None
    answer = _response_format(req, budget)
    if choice is not None:
        options.structural_tag = structural_tag(tools, choice, req.parallel_tool_calls is not False, answer)
    elif answer is not None:
        options.structural_tag = json_tag(answer)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return Plan(
        sequences=n,
        stream=bool(req.stream),
        include_usage=_include_usage(req, limits),
        continuous_usage=_continuous_usage(req),
        n=n,
        requested_tokens=requested,
        buffered_per_token=1 + (options.logprobs or 0),
        param="messages",
        options=options,
        messages=messages,
        tools=tools,
        tool_choice=choice,
        generation_prompt=req.add_generation_prompt,
        continue_final=req.continue_final_message,
    )


def _check_continuation(req: ChatCompletionRequest, messages: list[dict]) -> None:
    if req.continue_final_message and req.add_generation_prompt:
        raise APIError(
            "continue_final_message continues the last message: set add_generation_prompt to false with it",
            param="continue_final_message",
        )
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise APIError(
            f"continue_final_message needs the last message to be the assistant's, not {messages[-1]['role']!r}",
            param=f"messages[{len(messages) - 1}].role",
        )


def _tools(tools: list[Tool] | None, budget: SchemaBudget, limits: Limits) -> list[dict]:
    """Request tools -> {"name", "description", "parameters"}; 400 for too many, a description too long, or a
    schema that is not one (or takes the request over its schema budget)."""
    tools = tools or []
    if len(tools) > limits.max_tools:
        raise APIError(
            f"tools has {len(tools)} tools; this server allows at most {limits.max_tools} (--max-tools)",
            param="tools",
            code="too_many_tools",
        )
    out: list[dict] = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.description is not None and len(fn.description) > limits.max_tool_description_length:
            raise APIError(
                f"tools[{i}].function.description has {len(fn.description)} characters; this server allows at "
                f"most {limits.max_tool_description_length} (--max-tool-description-length)",
                param=f"tools[{i}].function.description",
                code="string_above_max_length",
            )
        param = f"tools[{i}].function.parameters"
        parameters = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
        budget.check(parameters, param)
        if parameters.get("type") != "object":
            raise APIError(f"{param} must be a JSON schema of type object", param=param)
        if any(t["name"] == fn.name for t in out):
            raise APIError(
                f"tools[{i}].function.name {fn.name!r} is given twice", param=f"tools[{i}].function.name"
            )
        out.append({"name": fn.name, "description": fn.description, "parameters": parameters})
    return out


def _tool_choice(req: ChatCompletionRequest, tools: list[dict]) -> str | None:
    """None when the model may not call tools, else "auto", "required" or the name of the function."""
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError("tool_choice requires tools", param="tool_choice")
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    name = choice.function.name
    if all(t["name"] != name for t in tools):
        raise APIError(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
    return name


def completion_plan(req: CompletionRequest, limits: Limits) -> Plan:
    check_model(req.model, limits)
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    _check_stream_options(req)
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise APIError(
            f"best_of ({req.best_of}) must equal n ({n}); best-of sampling is not supported", param="best_of"
        )
    prompts = _prompt_list(req.prompt, limits.vocab_size)
    _check_sequences(len(prompts) * n, "prompt" if len(prompts) > 1 else "n", limits)
    options = _options(req, n, limits)
    echo = bool(req.echo)
    options.logprobs = req.logprobs
    options.prompt_logprobs = req.logprobs if (echo and req.logprobs is not None) else None
    return Plan(
        sequences=len(prompts) * n,
        stream=bool(req.stream),
        include_usage=_include_usage(req, limits),
        continuous_usage=_continuous_usage(req),
        n=n,
        requested_tokens=req.max_tokens,
        buffered_per_token=1 + (req.logprobs or 0),
        param="prompt",
        options=options,
        prompts=prompts,
        echo=echo,
    )


def sampling_options(plan: Plan, prompt_lens: list[int], limits: Limits) -> list[SamplingOptions]:
    """Per prompt: its max_tokens within the context (400 context_length_exceeded otherwise), and, for a buffered
    (non-streamed) result, the bound on the memory it may hold (400 naming the parameters otherwise)."""
    budgets = [
        _context_budget(n, plan.requested_tokens, plan.param, limits.max_model_len) for n in prompt_lens
    ]
    if plan.options.min_tokens > min(budgets):
        raise APIError(
            f"min_tokens ({plan.options.min_tokens}) must not exceed max_tokens ({min(budgets)})",
            param="min_tokens",
        )
    if not plan.stream:
        echoed = sum(prompt_lens) if plan.options.prompt_logprobs is not None else 0
        entries = plan.n * sum(budgets) * plan.buffered_per_token + echoed * plan.buffered_per_token
        if entries > limits.max_buffered_tokens:
            asked = (
                "max_tokens"
                if plan.requested_tokens is not None
                else "max_tokens (default: the rest of the context)"
            )
            raise APIError(
                f"a non-streamed result of n ({plan.n}) x {asked} ({sum(budgets)}) x (1 + top_logprobs) "
                f"({plan.buffered_per_token}) = {entries} tokens exceeds this server's limit of "
                f"{limits.max_buffered_tokens}; lower n, max_tokens or top_logprobs, or set stream: true",
                param="max_tokens",
            )
    return [replace(plan.options, max_tokens=b, stop=list(plan.options.stop)) for b in budgets]


def check_model(model: str, limits: Limits) -> None:
    if model not in limits.base_names and model not in limits.adapters:
        raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")


def _check_stream_options(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")


def _continuous_usage(req: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(req.stream and req.stream_options and req.stream_options.continuous_usage_stats)


def _include_usage(req: ChatCompletionRequest | CompletionRequest, limits: Limits) -> bool:
    asked = bool(req.stream_options and req.stream_options.include_usage)
    return bool(req.stream) and (asked or limits.force_include_usage)


def _check_sequences(sequences: int, param: str, limits: Limits) -> None:
    if sequences > limits.max_sequences:
        raise APIError(
            f"this request asks for {sequences} sequences (prompts x n); this server allows at most "
            f"{limits.max_sequences} per request",
            param=param,
            code="too_many_sequences",
        )


def _context_budget(prompt_len: int, requested: int | None, param: str, limit: int) -> int:
    """max_tokens for the engine; 400 context_length_exceeded when prompt + completion exceed the context."""
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


def _options(req: ChatCompletionRequest | CompletionRequest, n: int, limits: Limits) -> SamplingOptions:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    _check_stop(stop, limits)
    vocab_size = limits.vocab_size
    if req.top_k is not None and req.top_k > vocab_size:
        raise APIError(
            f"top_k must be -1 or 0 (all tokens) or at most the vocabulary size ({vocab_size}); got {req.top_k}",
            param="top_k",
        )
    return SamplingOptions(
        max_tokens=0,  # decided per prompt by sampling_options()
        n=n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        stop=[s for s in stop if s],
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=req.min_tokens or 0,
        stream=bool(req.stream),
    )


def _check_stop(stop: list[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop_sequences:
        raise APIError(
            f"stop has {len(stop)} strings; this server allows at most {limits.max_stop_sequences} "
            "(--max-stop-sequences)",
            param="stop",
            code="too_many_stop_sequences",
        )
    for s in stop:
        if len(s) > limits.max_stop_length:
            raise APIError(
                f"a stop string has {len(s)} characters; this server allows at most {limits.max_stop_length} "
                "(--max-stop-length)",
                param="stop",
                code="string_above_max_length",
            )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(f"logit_bias keys must be token ids; got {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise APIError(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        out[token] = value
    return out


def _response_format(req: ChatCompletionRequest, budget: SchemaBudget) -> dict | None:
    """response_format -> the JSON schema a text answer must be valid for (None: free text). It is enforced
    with at most one blank between tokens, so a model cannot spend max_tokens padding an object (vLLM's own
    JSON mode allows any amount)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return {"type": "object"}
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise APIError(
            "response_format.json_schema.schema is required for type json_schema",
            param="response_format.json_schema",
        )
    schema = rf.json_schema.json_schema
    budget.check(schema, "response_format.json_schema.schema")
    return schema


def _prompt_list(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt")
    out = [list(prompt)] if all(isinstance(t, int) for t in prompt) else list(prompt)
    for p in out:
        if isinstance(p, list):
            if not p:
                raise APIError("prompt token lists must not be empty", param="prompt")
            if any(not 0 <= t < vocab_size for t in p):
                raise APIError(f"prompt token ids must be in 0..{vocab_size - 1}", param="prompt")
    return out
