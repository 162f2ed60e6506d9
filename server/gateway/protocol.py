"""OpenAI request/response/chunk/error models, in the official field order.

Requests accept what the official clients send (`max_completion_tokens` as well as `max_tokens`, content as a
string or a list of parts) plus vLLM-style sampling extras; unknown fields are ignored, as OpenAI does.
Responses are documented here and produced as exactly these shapes (streams by stream.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Extras vLLM accepts on both endpoints, documented here once.
_TOP_K = "vLLM extra: sample from the k most likely tokens; 0 or -1 = all."
_MIN_P = "vLLM extra: drop tokens less likely than min_p times the most likely one."
_REP = "vLLM extra: multiplicative penalty on tokens already present (1 = off)."
_IGNORE_EOS = "vLLM extra: keep generating past the end-of-sequence token."
_MIN_TOKENS = "vLLM extra: generate at least this many tokens before EOS or a stop string may end the output."

Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- chat -------------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Only `text` parts are supported.")
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(description="system, developer (treated as system), user or assistant.")
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    function_call: Any | None = None
    functions: list[dict[str, Any]] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="Deprecated by OpenAI; same as max_completion_tokens."
    )
    n: int | None = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    tool_choice: Any | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = Field(default=None, ge=-1, description=_TOP_K)
    min_p: float | None = Field(default=None, ge=0, le=1, description=_MIN_P)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, description=_REP)
    ignore_eos: bool | None = Field(default=False, description=_IGNORE_EOS)
    min_tokens: int | None = Field(default=None, ge=0, description=_MIN_TOKENS)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"


class ChatChoice(BaseModel):
    finish_reason: Literal["stop", "length"]
    index: int
    logprobs: ChoiceLogprobs | None = None
    message: AssistantMessage


class Usage(BaseModel):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChunkDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None


class ChunkChoice(BaseModel):
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (text/event-stream)."""

    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --- completions --------------------------------------------------------------------------------------------


class CompletionRequest(_Request):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt: a string or token ids; a list of several runs each as its own choices."
    )
    best_of: int | None = Field(default=None, ge=1, le=128, description="Only best_of == n is supported.")
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=1)
    n: int | None = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = Field(default=None, description="Not supported (400 if given).")
    temperature: float | None = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=1.0, gt=0, le=1)
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = Field(default=None, ge=-1, description=_TOP_K)
    min_p: float | None = Field(default=None, ge=0, le=1, description=_MIN_P)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, description=_REP)
    ignore_eos: bool | None = Field(default=False, description=_IGNORE_EOS)
    min_tokens: int | None = Field(default=None, ge=0, description=_MIN_TOKENS)


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None = None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(BaseModel):
    """A text completion; also the shape of each `data:` event when streamed."""

    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --- models, errors, health ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    status: str


class Version(BaseModel):
    version: str
    vllm: str | None = None
