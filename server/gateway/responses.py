"""OpenAI's Responses API (`POST /v1/responses`), stateless, over the chat path.

A Responses request is translated into a chat request and planned by plans.chat_plan, so the template, the
tool format and its guarantee, structured outputs, admission and metrics are the chat path's. This module holds
only what differs: the request model, the translation (and naming errors by the Responses parameter, not the
chat one), the Response object and the typed stream events.

Stateless by design: nothing is stored, so `store: true`, `previous_response_id`, `conversation`, `background`
and built-in tools are refused with a 400 naming the parameter. A client keeps the conversation itself and sends
it back as `input` items, as Codex CLI does with `store: false`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from server.gateway import render, tools
from server.gateway.errors import APIError, validation_error
from server.gateway.protocol import ChatCompletionRequest, Number
from server.gateway.stream import Answer, Stream, Usage


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart] = Field(
        description="Text only: `input_text` (or, for history, `output_text`)."
    )


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


# Tags are the class names, so error locations name `input[i].content`, not `input[i].message.content`.
_ITEM_TAGS = {
    "message": "InputMessage",
    "function_call": "FunctionCallItem",
    "function_call_output": "FunctionCallOutputItem",
}


def _item_type(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return _ITEM_TAGS.get(kind)


InputItem = Annotated[
    Annotated[InputMessage, Tag("InputMessage")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="input items are messages, function_call or function_call_output",
    ),
]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class Reasoning(_Strict):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Strict):
    model: str
    input: list[InputItem] | str
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    tools: list[dict[str, Any]] | None = Field(default=None, description="Function tools only.")
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Accepted with the one value a stateless server honours; anything else is a 400 (check_unsupported).
    store: bool | None = Field(default=None, description="Only false: nothing is stored.")
    previous_response_id: str | None = Field(default=None, description="Not supported (nothing is stored).")
    conversation: Any | None = Field(default=None, description="Not supported (nothing is stored).")
    background: bool | None = Field(default=None, description="Only false.")
    include: list[str] | None = Field(
        default=None, description="Only `reasoning.encrypted_content`, which is empty for this model."
    )
    reasoning: Reasoning | None = Field(
        default=None, description="This model does not reason; effort none only."
    )
    truncation: Literal["disabled"] | None = Field(default=None, description="Only disabled.")
    top_logprobs: int | None = Field(default=None, ge=0, le=0, description="Not supported: 0 only.")
    # vLLM-style extras, as on chat
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool | None = None
    priority: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1, description="As on chat.")


# --- Responses request -> chat request ------------------------------------------------------------------------


@dataclass
class Translation:
    chat: ChatCompletionRequest
    tools: list[dict] = field(default_factory=list)  # the request's function tools, in the Response's shape
    source: list[str] = field(
        default_factory=list
    )  # chat message index -> the Responses parameter it came from


def to_chat(req: ResponsesRequest) -> Translation:
    """The chat request that means the same; its validation (plans.chat_plan) then applies unchanged."""
    check_unsupported(req)
    messages: list[dict] = []
    source: list[str] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
        source.append("instructions")
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    if not items:
        raise APIError("input must not be empty", param="input")
    calls: set[str] = set()
    for i, item in enumerate(items):
        param = "input" if isinstance(req.input, str) else f"input[{i}]"
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            calls.add(item.call_id)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # text and the calls after it are one turn
                continue
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item.call_id not in calls:
                raise APIError(
                    f"{param}.call_id {item.call_id!r} answers no function_call item before it",
                    param=f"{param}.call_id",
                )
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        source.append(param)
    chat: dict[str, Any] = {"model": req.model, "messages": messages, "stream": bool(req.stream)}
    function_tools = _function_tools(req.tools or [])
    if function_tools:
        chat["tools"] = [
            {"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if t[k]}}
            for t in function_tools
        ]
    if isinstance(req.tool_choice, NamedFunction):
        chat["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        chat["tool_choice"] = req.tool_choice
    if req.parallel_tool_calls is not None:
        chat["parallel_tool_calls"] = req.parallel_tool_calls
    if req.max_output_tokens is not None:
        chat["max_completion_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "top_k", "ignore_eos", "user"):
        if getattr(req, name) is not None:
            chat[name] = getattr(req, name)
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        chat["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            spec = {"name": fmt.name or "response", "description": fmt.description, "strict": fmt.strict}
            chat["response_format"]["json_schema"] = {**spec, "schema": fmt.json_schema}
    try:
        return Translation(ChatCompletionRequest.model_validate(chat), function_tools, source)
    except ValidationError as exc:
        raise renamed(validation_error(RequestValidationError(exc.errors())), source) from None


def check_unsupported(req: ResponsesRequest) -> None:
    """What a stateless server without built-in tools cannot do: a 400 naming it, never silently ignored."""
    refusals = [
        (
            "store",
            req.store,
            "nothing is stored on this server; send store: false and keep the conversation as input items",
        ),
        (
            "previous_response_id",
            req.previous_response_id,
            "responses are not stored; send the earlier turns as input items",
        ),
        (
            "conversation",
            req.conversation,
            "conversations are not stored; send the earlier turns as input items",
        ),
        ("background", req.background, "background responses need a stored response; stream instead"),
    ]
    for param, value, why in refusals:
        if value:
            raise APIError(f"{param} is not supported: {why}", param=param)
    for i, name in enumerate(req.include or []):
        if name != "reasoning.encrypted_content":
            raise APIError(f"include[{i}] {name!r} is not supported", param=f"include[{i}]")
    if req.reasoning is not None and req.reasoning.effort not in (None, "none"):
        raise APIError("this model does not reason: reasoning.effort must be none", param="reasoning.effort")


def _function_tools(raw: list[dict[str, Any]]) -> list[dict]:
    out = []
    for i, tool in enumerate(raw):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(
                f"tools[{i}].type {kind!r} is not supported: only function tools; built-in tools (web search, "
                "file search, code interpreter, ...) do not run on this server",
                param=f"tools[{i}].type",
            )
        try:
            t = FunctionTool.model_validate(tool)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", "tools", i, *e["loc"])} for e in exc.errors()]
            raise validation_error(RequestValidationError(errors)) from None
        out.append(
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
        )
    return out


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "\n".join(p.text for p in content)


_CHAT_PARAMS = [
    (re.compile(r"messages\[(\d+)\][\w.\[\]]*"), None),  # -> the input item (or instructions) it came from
    (re.compile(r"tools\[(\d+)\]\.function\."), r"tools[\1]."),
    (re.compile(r"tool_choice\.function\.name"), "tool_choice.name"),
    (re.compile(r"response_format(\.json_schema)?(\.schema)?"), "text.format"),
    (re.compile(r"max_completion_tokens|\bmax_tokens\b"), "max_output_tokens"),
    (re.compile(r"\bmessages\b"), "input"),
]


def renamed(exc: APIError, source: list[str]) -> APIError:
    """A chat-path error, with the parameter (in `param` and in the message) as the Responses API names it."""

    def rename(text: str) -> str:
        for pattern, repl in _CHAT_PARAMS:
            if repl is None:
                text = pattern.sub(lambda m: source[int(m[1])] if int(m[1]) < len(source) else "input", text)
            else:
                text = pattern.sub(repl, text)
        return text

    exc.message = rename(exc.message)
    exc.args = (exc.message,)
    if exc.param is not None:
        exc.param = rename(exc.param)
    return exc


# --- the Response object ----------------------------------------------------------------------------------------


class Shell:
    """The fields of a Response that come from the request: the same in every event and in the final body."""

    def __init__(self, resp_id: str, model: str, req: ResponsesRequest, tr: Translation) -> None:
        fmt = req.text.format if req.text and req.text.format else None
        text_format: dict = {"type": "text"}
        if fmt is not None and fmt.type == "json_schema":
            text_format = {
                "type": "json_schema",
                "name": fmt.name or "response",
                "schema": fmt.json_schema,
                "strict": bool(fmt.strict),
            }
            if fmt.description:
                text_format["description"] = fmt.description
        elif fmt is not None:
            text_format = {"type": fmt.type}
        choice: Any = (
            req.tool_choice.model_dump()
            if isinstance(req.tool_choice, NamedFunction)
            else (req.tool_choice or ("auto" if tr.tools else "none"))
        )
        self.fields = {
            "id": resp_id,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": text_format},
            "tool_choice": choice,
            "tools": tr.tools,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": "disabled",
        }
        if req.user is not None:
            self.fields["user"] = req.user

    def body(
        self,
        status: str,
        output: list[dict],
        usage: dict | None = None,
        incomplete: str | None = None,
        error: dict | None = None,
    ) -> dict:
        body = {
            **self.fields,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "output": output,
        }
        if usage is not None:  # absent while in progress, as at OpenAI
            body["usage"] = usage
        return body


def usage(u: Usage) -> dict:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def message_item(text: str, status: str) -> dict:
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [_output_text(text)],
    }


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": "fc_" + call_id.removeprefix("call_"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _outcome(finish: str | None) -> tuple[str, str | None]:
    """(status, incomplete reason): output cut by the token limit is `incomplete`, as at OpenAI."""
    return ("incomplete", "max_output_tokens") if finish == "length" else ("completed", None)


def response_body(shell: Shell, a: Answer, u: Usage) -> dict:
    status, reason = _outcome(a.finish)
    output = [message_item(a.text, status)] if a.text or not a.calls else []
    output += [call_item(c.id, c.name, c.arguments, status) for c in a.calls]
    return shell.body(status, output, usage(u), reason)


# --- the event stream -------------------------------------------------------------------------------------------


class _Events:
    """Typed events with their sequence numbers, and the output items as they open, grow and close."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.seq = -1
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being written: a message or a function_call

    def event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return render.named_sse(kind, {"type": kind, "sequence_number": self.seq, **data})

    def response(self, kind: str, status: str, **body: Any) -> bytes:
        return self.event(kind, response=self.shell.body(status, self.output, **body))

    def add(self, e: tools.Event) -> list[bytes]:
        out: list[bytes] = []
        if e.kind == "content":
            if self.open is None or self.open["type"] != "message":
                out += self.close("completed")
                out += self._open(message_item("", "in_progress"))
                out.append(self._part("response.content_part.added", _output_text("")))
            self.open["content"][0]["text"] += e.text
            out.append(self._part("response.output_text.delta", delta=e.text, logprobs=[]))
        elif e.kind == "call":
            out += self.close("completed")
            out += self._open(call_item(e.call_id, e.name, "", "in_progress"))
        else:
            self.open["arguments"] += e.text
            out.append(self._item_event("response.function_call_arguments.delta", delta=e.text))
        return out

    def _open(self, item: dict) -> list[bytes]:
        self.output.append(item)
        self.open = item
        return [self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def _item_event(self, kind: str, **data: Any) -> bytes:
        return self.event(kind, item_id=self.open["id"], output_index=len(self.output) - 1, **data)

    def _part(self, kind: str, part: dict | None = None, **data: Any) -> bytes:
        if part is not None:
            data["part"] = part
        return self._item_event(kind, content_index=0, **data)

    def close(self, status: str) -> list[bytes]:
        item, out = self.open, []
        if item is None:
            return out
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(self._part("response.output_text.done", text=text, logprobs=[]))
            out.append(self._part("response.content_part.done", _output_text(text)))
        else:
            out.append(
                self._item_event(
                    "response.function_call_arguments.done", name=item["name"], arguments=item["arguments"]
                )
            )
        item["status"] = status
        out.append(self.event("response.output_item.done", output_index=len(self.output) - 1, item=item))
        self.open = None
        return out


async def response_events(stream: Stream, shell: Shell) -> AsyncIterator[bytes]:
    """response.created, response.in_progress, then per output item: output_item.added, its content part and
    text deltas (or function-call argument deltas), their .done events, output_item.done; then
    response.completed, response.incomplete (token limit) or response.failed."""
    events = _Events(shell)
    yield events.response("response.created", "in_progress")
    yield events.response("response.in_progress", "in_progress")
    finish = None
    async for deltas in stream:
        for d in deltas:
            for e in d.events if d.events is not None else [tools.Event("content", d.text)] if d.text else []:
                for out in events.add(e):
                    yield out
            finish = d.finish or finish
    if stream.failure is not None:  # the headers are sent: response.failed ends the stream
        for out in events.close("incomplete"):
            yield out
        error = {"code": "server_error", "message": stream.failure.message}
        yield events.response("response.failed", "failed", error=error)
        return
    status, reason = _outcome(finish)
    if not events.output:  # an empty answer is still one (empty) message, as in the non-streamed body
        for out in events.add(tools.Event("content", "")):
            yield out
    for out in events.close(status):
        yield out
    kind = "response.completed" if status == "completed" else "response.incomplete"
    yield events.response(kind, status, usage=usage(stream.usage), incomplete=reason)
