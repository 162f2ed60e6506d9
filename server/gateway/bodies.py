"""Response models: what render.py, responses.py and anthropic.py write, for /openapi.json. Tests validate the
bytes the gateway sends against them (and against OpenAI's own published schemas), so the two cannot drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # A field the gateway writes that is not declared here fails the tests that validate its bodies.
    model_config = ConfigDict(extra="forbid")


# --- chat ------------------------------------------------------------------------------------------------------


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Body):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CalledFunction(_Body):
    name: str
    arguments: str = Field(description="JSON text; a prefix of it when max_tokens cut the call short.")


class AssistantToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(_Body):
    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[AssistantToolCall] | None = Field(
        default=None, description="Present when the model called tools."
    )


class ChatChoice(_Body):
    finish_reason: Literal["stop", "length", "tool_calls"]
    index: int
    logprobs: ChoiceLogprobs | None = None
    message: AssistantMessage


class PromptTokensDetails(_Body):
    cached_tokens: int = Field(description="Prompt tokens found in the engine's prefix cache.")


class Usage(_Body):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(_Body):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ToolCallDelta(_Body):
    index: int
    id: str | None = Field(default=None, description="First delta of a call only.")
    type: Literal["function"] | None = None
    function: dict[str, str] | None = Field(
        default=None, description="`name` first, then `arguments` fragments."
    )


class ChunkDelta(_Body):
    content: str | None = None
    role: Literal["assistant"] | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Body):
    delta: ChunkDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    index: int
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Body):
    """One `data:` event of a streamed chat completion (text/event-stream)."""

    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --- completion responses ---------------------------------------------------------------------------------


class CompletionLogprobs(_Body):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(_Body):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(_Body):
    """A text completion; also the shape of each `data:` event when streamed."""

    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --- models, errors, health ----------------------------------------------------------------------------------


class ModelCard(_Body):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str
    max_model_len: int
    root: str = Field(description="The base model's name, or a LoRA adapter's own name (never a path).")
    parent: str | None = Field(default=None, description="For a LoRA adapter: the base model it adapts.")


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Body):
    error: ErrorDetail


class Status(_Body):
    status: str


class Version(_Body):
    version: str
    vllm: str | None = None
