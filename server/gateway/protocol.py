"""OpenAI request models: strict JSON types, in OpenAI's field order (a boolean where a number belongs is a 400,
as at OpenAI). What a valid request means, and every 400 that needs more than its types, is plan.py's.
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
# JSON numbers: an integer is a number, a boolean or a string is not (strict mode).
Number = float

# The sampling fields chat and completions share, declared once (each request lists them in OpenAI's order).
Penalty = Annotated[Number | None, Field(ge=-2, le=2)]
LogitBias = dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None
Choices = Annotated[int | None, Field(ge=1, le=128)]
Stop = str | list[str] | None
Temperature = Annotated[Number | None, Field(ge=0, le=2)]
TopP = Annotated[Number | None, Field(gt=0, le=1)]
TopK = Annotated[int | None, Field(ge=-1, description=_TOP_K)]
MinP = Annotated[Number | None, Field(ge=0, le=1, description=_MIN_P)]
RepetitionPenalty = Annotated[Number | None, Field(gt=0, le=10, description=_REP)]
IgnoreEOS = Annotated[bool | None, Field(description=_IGNORE_EOS)]
MinTokens = Annotated[int | None, Field(ge=0, description=_MIN_TOKENS)]
Priority = Annotated[
    int | None,
    Field(
        ge=-(2**31),
        le=2**31 - 1,
        description="vLLM extra: scheduling priority, lower runs first (needs --scheduling-policy priority); "
        "default: the API key's.",
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())


# --- chat -------------------------------------------------------------------------------------------------


class ContentPart(_Strict):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(description="Only `text` parts are supported.")
    text: str | None = Field(default=None, description="Required for `text` parts.")


class FunctionCall(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str = Field(description="system, developer (treated as system), user, assistant or tool.")
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="An assistant's calls (content may be null)."
    )
    tool_call_id: str | None = Field(
        default=None, description="A tool message: the id of the call it answers."
    )


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of an object.")
    strict: bool | None = Field(
        default=None, description="Arguments always follow the schema, strict or not."
    )


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = Field(
        default=None, description="vLLM extra: every chunk carries the usage so far."
    )


class ChatCompletionRequest(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: Penalty = 0.0
    function_call: Any | None = Field(
        default=None, description="Deprecated by OpenAI: use tool_choice (400)."
    )
    functions: list[dict[str, Any]] | None = Field(
        default=None, description="Deprecated by OpenAI: use tools (400)."
    )
    logit_bias: LogitBias = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="Deprecated by OpenAI; same as max_completion_tokens."
    )
    n: Choices = 1
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one tool call.")
    presence_penalty: Penalty = 0.0
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(default=None, description="Only with `stream: true`.")
    temperature: Temperature = 1.0
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="Default: auto when tools are given, else none."
    )
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: TopP = 1.0
    user: str | None = None
    # vLLM-style extras
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: IgnoreEOS = False
    min_tokens: MinTokens = None
    priority: Priority = None
    add_generation_prompt: bool = Field(
        default=True, description="vLLM extra: end the prompt with the assistant's turn opened."
    )
    continue_final_message: bool = Field(
        default=False,
        description="vLLM extra: continue the last message, an assistant's, instead of answering it (needs "
        "add_generation_prompt false): the output extends its text.",
    )


# --- completions --------------------------------------------------------------------------------------------


class CompletionRequest(_Strict):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt: a string or token ids; a list of several runs each as its own choices."
    )
    best_of: int | None = Field(default=None, ge=1, le=128, description="Only best_of == n is supported.")
    echo: bool | None = False
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=1)
    n: Choices = 1
    presence_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(default=None, description="Only with `stream: true`.")
    suffix: str | None = Field(default=None, description="Not supported (400 if given).")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    user: str | None = None
    # vLLM-style extras
    top_k: TopK = None
    min_p: MinP = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: IgnoreEOS = False
    min_tokens: MinTokens = None
    priority: Priority = None


# --- LoRA adapters (vLLM's runtime API) -------------------------------------------------------------------------


class LoadAdapterRequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1, description="The name requests pass as `model`.")
    lora_path: str = Field(
        min_length=1, description="A peft adapter directory the server can read, or a repo id."
    )


class UnloadAdapterRequest(_Strict):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: str = Field(min_length=1)
