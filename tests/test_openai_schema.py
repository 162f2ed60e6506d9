"""The OpenAI-schema helper accepts valid bodies and, above all, rejects invalid ones (no server needed)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests import openai_schema

CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": CREATED,
    "model": "deepseek-v2-lite",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}

CHAT_CHUNK_USAGE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": CREATED,
    "model": "deepseek-v2-lite",
    "choices": [],
    "usage": USAGE,
}

CHAT_CHUNK_ROLE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": CREATED,
    "model": "deepseek-v2-lite",
    "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ],
    "usage": None,
}

COMPLETION: dict[str, Any] = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": CREATED,
    "model": "deepseek-v2-lite",
    "choices": [
        {
            "index": 0,
            "text": " world",
            "finish_reason": "length",
            "logprobs": {
                "tokens": [" world"],
                "token_logprobs": [-0.25],
                "top_logprobs": [{" world": -0.25, " there": -1.5}],
                "text_offset": [5],
            },
        }
    ],
    "usage": USAGE,
}

MODEL: dict[str, Any] = {
    "id": "deepseek-v2-lite",
    "object": "model",
    "created": CREATED,
    "owned_by": "dsv2-serve",
}

MODEL_LIST: dict[str, Any] = {"object": "list", "data": [MODEL]}

ERROR: dict[str, Any] = {
    "error": {"message": "model 'x' not found", "type": "invalid_request_error", "param": None, "code": None}
}


@pytest.fixture(autouse=True)
def _spec() -> None:
    openai_schema.require_spec()


_DELETE = object()


def _with(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``body`` with the dotted ``path`` set to ``value`` (or removed when value is ``_DELETE``)."""
    out = copy.deepcopy(body)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize(
    ("check", "body"),
    [
        (openai_schema.chat_completion, CHAT_COMPLETION),
        (openai_schema.chat_chunk, CHAT_CHUNK_USAGE),
        (openai_schema.chat_chunk, CHAT_CHUNK_ROLE),
        (openai_schema.chat_chunk, _with(CHAT_CHUNK_ROLE, "choices.0.delta", {"content": "Hel"})),
        (openai_schema.chat_chunk, _with(CHAT_CHUNK_ROLE, "choices.0.finish_reason", "stop")),
        (openai_schema.completion, COMPLETION),
        (openai_schema.completion, _with(COMPLETION, "choices.0.logprobs", None)),
        (openai_schema.completion_chunk, _with(COMPLETION, "choices.0.finish_reason", None)),
        (openai_schema.model_list, MODEL_LIST),
        (openai_schema.model_list, {"object": "list", "data": []}),
        (openai_schema.model, MODEL),
        (openai_schema.error, ERROR),
        (
            openai_schema.error,
            _with(ERROR, "error", {**ERROR["error"], "param": "model", "code": "model_not_found"}),
        ),
    ],
    ids=[
        "chat-completion",
        "chat-chunk-usage-only",
        "chat-chunk-role",
        "chat-chunk-content",
        "chat-chunk-finish",
        "completion-legacy-logprobs",
        "completion-null-logprobs",
        "completion-chunk-null-finish",
        "model-list",
        "model-list-empty",
        "model",
        "error-null-param-code",
        "error-param-code",
    ],
)
def test_valid_bodies_pass(check: Callable[[object], None], body: dict[str, Any]) -> None:
    check(body)


@pytest.mark.parametrize(
    ("check", "body", "message"),
    [
        # chat completion
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices.0.finish_reason", "error"),
            "'error' is not one of",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices.0.finish_reason", None),
            "None is not",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices", _DELETE),
            "'choices' is a required property",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "created", str(CREATED)),
            "is not of type 'integer'",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "object", "chat.completion.chunk"),
            "is not one of",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "model", None),
            "None is not of type 'string'",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices.0.logprobs", _DELETE),
            "'logprobs' is a required",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices.0.message.refusal", _DELETE),
            "'refusal' is a required",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "choices.0.message.role", "user"),
            "is not one of",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "usage", None),
            "None is not of type 'object'",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "usage.total_tokens", _DELETE),
            "'total_tokens' is a required",
        ),
        (
            openai_schema.chat_completion,
            _with(CHAT_COMPLETION, "system_fingerprint", None),
            "None is not of type 'string'",
        ),
        (
            openai_schema.chat_completion,
            _with(
                CHAT_COMPLETION,
                "choices.0.logprobs",
                {"content": [{"token": "Hi", "logprob": -0.1}], "refusal": None},
            ),
            "'bytes' is a required property at $.choices[0].logprobs.content[0]",
        ),
        # chat chunk
        (
            openai_schema.chat_chunk,
            _with(CHAT_CHUNK_ROLE, "choices.0.finish_reason", "error"),
            "'error' is not one of",
        ),
        (
            openai_schema.chat_chunk,
            _with(CHAT_CHUNK_ROLE, "choices.0.finish_reason", _DELETE),
            "'finish_reason' is a required",
        ),
        (
            openai_schema.chat_chunk,
            _with(CHAT_CHUNK_ROLE, "choices.0.delta", None),
            "None is not of type 'object'",
        ),
        (
            openai_schema.chat_chunk,
            _with(CHAT_CHUNK_ROLE, "choices.0.delta.role", "bot"),
            "'bot' is not one of",
        ),
        (openai_schema.chat_chunk, _with(CHAT_CHUNK_ROLE, "object", "chat.completion"), "is not one of"),
        (openai_schema.chat_chunk, _with(CHAT_CHUNK_USAGE, "choices", None), "None is not of type 'array'"),
        (
            openai_schema.chat_chunk,
            _with(CHAT_CHUNK_USAGE, "usage.prompt_tokens", "5"),
            "is not of type 'integer'",
        ),
        # completion
        (
            openai_schema.completion,
            _with(COMPLETION, "choices.0.finish_reason", "tool_calls"),
            "is not one of",
        ),
        (openai_schema.completion, _with(COMPLETION, "choices.0.finish_reason", None), "None is not"),
        (
            openai_schema.completion,
            _with(COMPLETION, "choices.0.text", _DELETE),
            "'text' is a required property",
        ),
        (
            openai_schema.completion,
            _with(COMPLETION, "choices.0.logprobs", _DELETE),
            "'logprobs' is a required property",
        ),
        (
            openai_schema.completion,
            _with(COMPLETION, "choices.0.logprobs.token_logprobs", [None]),
            "None is not of type",
        ),
        (
            openai_schema.completion,
            _with(COMPLETION, "choices.0.logprobs.top_logprobs", [None]),
            "None is not of type",
        ),
        (openai_schema.completion, _with(COMPLETION, "object", "chat.completion"), "is not one of"),
        (
            openai_schema.completion_chunk,
            _with(COMPLETION, "choices.0.finish_reason", "error"),
            "'error' is not one of",
        ),
        (openai_schema.completion_chunk, _with(COMPLETION, "created", 1.5), "is not of type 'integer'"),
        # models
        (openai_schema.model_list, _with(MODEL_LIST, "object", "models"), "is not one of"),
        (openai_schema.model_list, _with(MODEL_LIST, "data", _DELETE), "'data' is a required property"),
        (openai_schema.model_list, _with(MODEL_LIST, "data.0.owned_by", _DELETE), "'owned_by' is a required"),
        (openai_schema.model, _with(MODEL, "created", None), "None is not of type 'integer'"),
        (openai_schema.model, _with(MODEL, "object", "list"), "is not one of"),
        # errors
        (openai_schema.error, _with(ERROR, "error.message", _DELETE), "'message' is a required property"),
        (openai_schema.error, _with(ERROR, "error.param", _DELETE), "'param' is a required property"),
        (openai_schema.error, _with(ERROR, "error.code", _DELETE), "'code' is a required property"),
        (openai_schema.error, _with(ERROR, "error.type", None), "None is not of type 'string'"),
        (openai_schema.error, _with(ERROR, "error.code", 404), "404 is not of type"),
        (openai_schema.error, {"detail": "Not Found"}, "'error' is a required property"),
    ],
)
def test_invalid_bodies_fail(check: Callable[[object], None], body: dict[str, Any], message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check(body)


def test_failure_message_is_readable() -> None:
    with pytest.raises(AssertionError) as info:
        openai_schema.chat_completion(_with(CHAT_COMPLETION, "choices.0.finish_reason", "error"))
    text = str(info.value)
    assert "CreateChatCompletionResponse" in text
    assert "$.choices[0].finish_reason" in text
    assert "schema path:" in text and "finish_reason" in text.split("schema path:")[1]


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        openai_schema.validate("NoSuchSchema", {})


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string", "nullable": True}, {"type": ["string", "null"]}),
        (
            {"type": "string", "enum": ["a"], "nullable": True},
            {"type": ["string", "null"], "enum": ["a", None]},
        ),
        ({"enum": ["a"], "nullable": True}, {"enum": ["a", None]}),
        ({"$ref": "#/x", "nullable": True}, {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}),
        (
            {"allOf": [{"$ref": "#/x"}], "nullable": True},
            {"anyOf": [{"allOf": [{"$ref": "#/x"}]}, {"type": "null"}]},
        ),
        (
            {"type": "object", "oneOf": [{}], "nullable": True},
            {"anyOf": [{"type": "object", "oneOf": [{}]}, {"type": "null"}]},
        ),
        ({"type": "string", "nullable": False}, {"type": "string"}),
        (
            {
                "type": "object",
                "properties": {"nullable": {"type": "integer", "nullable": True}},
                "required": ["nullable"],
            },
            {
                "type": "object",
                "properties": {"nullable": {"type": ["integer", "null"]}},
                "required": ["nullable"],
            },
        ),
        (
            {"type": "array", "items": {"type": "number", "nullable": True}, "default": {"nullable": True}},
            {"type": "array", "items": {"type": ["number", "null"]}, "default": {"nullable": True}},
        ),
    ],
)
def test_convert_nullable(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert openai_schema.convert_nullable(schema) == expected


def test_no_nullable_keyword_left_in_checked_schemas() -> None:
    """Every schema the wrappers reach is nullable-free and a valid Draft 2020-12 schema after conversion."""
    schemas = openai_schema.converted_schemas()
    todo = [
        openai_schema.CHAT_COMPLETION,
        openai_schema.CHAT_CHUNK,
        openai_schema.COMPLETION,
        openai_schema.MODEL_LIST,
        openai_schema.MODEL,
        openai_schema.ERROR,
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        Draft202012Validator.check_schema(schemas[name])
        text = repr(schemas[name])
        assert "'nullable': True" not in text, name
        todo += re.findall(r"'#/components/schemas/([^']+)'", text)
    assert {
        "CompletionUsage",
        "ChatCompletionStreamResponseDelta",
        "Error",
        "ChatCompletionTokenLogprob",
    } <= seen


def test_require_spec_skips_when_document_is_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(openai_schema, "SPEC_PATH", tmp_path / "openapi.json")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=r"not found at .*openapi\.json \(\.\./shared is absent\)"
    ):
        openai_schema.require_spec()
    assert not openai_schema.available()


def test_a_missing_document_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(openai_schema, "SPEC_PATH", tmp_path / "openapi.json")
    monkeypatch.setenv("CI", "true")
    for check in (openai_schema.require_spec, openai_schema.available):
        with pytest.raises(pytest.fail.Exception, match="fetch-references.sh"):
            check()
