"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the same engine path.

A Messages request is translated into a chat request and planned by plans.chat_plan, so the template, the
tool format and its guarantee, admission and metrics are the chat path's, not a second copy. This module
holds only what differs: Anthropic's request models, the translation, and Anthropic's response shapes and
stream events. Errors on this path come in Anthropic's shape (errors.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import partial_json_parser
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.gateway import render, tools
from server.gateway.errors import APIError, validation_error
from server.gateway.protocol import ChatCompletionRequest
from server.gateway.stream import Answer, Stream, Usage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class MessagesRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1, description="Required, as at Anthropic.")
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


# --- Messages request -> chat request ---------------------------------------------------------------------------


def to_chat(req: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat request that means the same; its validation (plans.chat_plan) then applies unchanged."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text(req.system)})
    for m in req.messages:
        messages.extend(_turn(m))
    chat: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if choice.type == "tool":
            if not choice.name:
                raise APIError("tool_choice.name is required for type tool", param="tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            chat["parallel_tool_calls"] = False
    if isinstance(req, MessagesRequest):
        chat["max_tokens"] = req.max_tokens
        chat["stream"] = bool(req.stream)
        for name in ("temperature", "top_p", "top_k"):
            if getattr(req, name) is not None:
                chat[name] = getattr(req, name)
        if req.stop_sequences:
            chat["stop"] = req.stop_sequences
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:  # e.g. a tool name the chat API does not allow
        raise validation_error(RequestValidationError(exc.errors())) from None


# A chat-path parameter -> the Messages API's name for it (in `param` and in the message).
_CHAT_PARAMS = [
    (re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"tool_choice\.function\.name"), "tool_choice.name"),
    (re.compile(r"(?<![-\w])stop(?![-\w]| string)"), "stop_sequences"),
    (re.compile(r"max_completion_tokens"), "max_tokens"),
]


def renamed(exc: APIError) -> APIError:
    """A chat-path error, with the parameter named as the Messages API names it."""

    def rename(text: str) -> str:
        for pattern, repl in _CHAT_PARAMS:
            text = pattern.sub(repl, text)
        return text

    if exc.param is not None:
        exc.param = rename(exc.param)
        exc.message = rename(exc.message)
        exc.args = (exc.message,)
    return exc


def _turn(m: Message) -> list[dict]:
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts = [b.text for b in m.content if isinstance(b, TextBlock)]
    if m.role == "assistant":
        calls = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
            for b in m.content
            if isinstance(b, ToolUseBlock)
        ]
        turn: dict = {"role": "assistant", "content": "".join(texts) or None}
        if calls:
            turn["tool_calls"] = calls
        return [turn]
    out = [
        {"role": "tool", "tool_call_id": b.tool_use_id, "content": _text(b.content or "")}
        for b in m.content
        if isinstance(b, ToolResultBlock)
    ]
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "\n".join(b.text for b in content)


# --- responses ------------------------------------------------------------------------------------------------


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    """OpenAI's finish reason (stream.py) -> Anthropic's stop reason."""
    if finish == "tool_calls":
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def message_body(msg_id: str, model: str, a: Answer, u: Usage) -> dict:
    content: list[dict] = [{"type": "text", "text": a.text}] if a.text or not a.calls else []
    content += [
        {"type": "tool_use", "id": _tool_use_id(c.id), "name": c.name, "input": _input(c.arguments)}
        for c in a.calls
    ]
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(a.finish, a.stop),
        "stop_sequence": a.stop,
        "usage": {
            "input_tokens": u.prompt_tokens,
            "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens,
        },
    }


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict:
    """A call's input object. A call cut short by max_tokens has a prefix of its JSON: Anthropic's input must
    still be an object, so the prefix is read with its open strings, arrays and objects closed."""
    try:
        value = partial_json_parser.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def message_events(stream: Stream, msg_id: str, model: str) -> AsyncIterator[bytes]:
    """Anthropic's stream: message_start, ping, content blocks (text deltas; tool_use blocks with
    input_json_delta fragments), message_delta (stop reason, output tokens), message_stop."""
    yield render.named_sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": stream.usage.prompt_tokens, "output_tokens": 0},
            },
        },
    )
    yield render.named_sse("ping", {"type": "ping"})
    blocks = _Blocks()
    finish = stop = None
    async for deltas in stream:
        for d in deltas:
            for event in (
                d.events if d.events is not None else [tools.Event("content", d.text)] if d.text else []
            ):
                for out in blocks.add(event):
                    yield out
            if d.finish is not None:
                finish, stop = d.finish, d.stop
    if stream.failure is not None:  # the headers are sent: an error event ends the stream
        yield render.named_sse("error", stream.failure.anthropic_body())
        return
    for out in blocks.close():
        yield out
    yield render.named_sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(finish, stop), "stop_sequence": stop},
            "usage": {"output_tokens": stream.usage.completion_tokens},
        },
    )
    yield render.named_sse("message_stop", {"type": "message_stop"})


class _Blocks:
    """Content blocks as they open and close: consecutive text is one block, each tool call its own."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "text" | "tool_use"

    def add(self, event: tools.Event) -> list[bytes]:
        out: list[bytes] = []
        if event.kind == "content":
            if self.open != "text":
                out += self.close()
                out.append(self._start({"type": "text", "text": ""}, "text"))
            delta = {"type": "text_delta", "text": event.text}
        elif event.kind == "call":
            out += self.close()
            block = {"type": "tool_use", "id": _tool_use_id(event.call_id), "name": event.name, "input": {}}
            out.append(self._start(block, "tool_use"))
            return out
        else:
            delta = {"type": "input_json_delta", "partial_json": event.text}
        out.append(
            render.named_sse(
                "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}
            )
        )
        return out

    def _start(self, block: dict, kind: str) -> bytes:
        self.index += 1
        self.open = kind
        return render.named_sse(
            "content_block_start",
            {"type": "content_block_start", "index": self.index, "content_block": block},
        )

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [render.named_sse("content_block_stop", {"type": "content_block_stop", "index": self.index})]
