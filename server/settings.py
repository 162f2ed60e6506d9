"""Every knob of the server, with a description, from command-line flags or `DSV2_*` environment variables.

Precedence: flag > environment variable > default. Unknown flags after ours are handed to vLLM's own
engine-argument parser (`--enable-prefix-caching`, `--kv-cache-dtype fp8`, ...), so every vLLM engine option
is reachable without a flag of ours for each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ModelSettings(BaseSettings):
    """What to serve: the model, its names and adapters, and how the engine runs it. `Settings` adds the server's
    own knobs; fields keep their order across the two (flags and docs list them so)."""

    model_config = SettingsConfigDict(env_prefix="DSV2_", extra="ignore", protected_namespaces=())

    model: str = Field(
        description="Model directory or Hugging Face repo id (e.g. deepseek-ai/DeepSeek-V2-Lite-Chat)."
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names clients pass as `model`, comma-separated: the first is canonical, the rest aliases "
        "(listed on /v1/models; responses report the name asked for). Default: the model's directory or repo name.",
    )
    hidden_model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More accepted names (e.g. gpt-4o-mini, deepseek-chat), comma-separated, not listed on /v1/models.",
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters served beside the base model, as name=path (a peft adapter directory or repo "
        "id), space- or comma-separated; a request selects one with `model: name`. Turns on vLLM's --enable-lora.",
    )
    allow_runtime_lora_updating: bool = Field(
        default=False,
        description="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA API) to "
        "admin keys, loading from --lora-adapter-dirs. Turns on vLLM's --enable-lora.",
    )
    lora_adapter_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Directories (comma-separated) the runtime LoRA API may load adapters from: a lora_path must "
        "lie inside one of them. Empty: no local path may be loaded at run time.",
    )
    allow_lora_hub_ids: bool = Field(
        default=False,
        description="Let the runtime LoRA API take a Hugging Face repo id as lora_path (the engine downloads it).",
    )
    max_runtime_adapters: int = Field(
        default=8, ge=0, description="Most LoRA adapters loaded through the runtime API at once (400 above)."
    )
    revision: str | None = Field(
        default=None,
        description="With a repo id as --model: the branch, tag or commit to download (a commit sha pins it); "
        "default: main.",
    )
    download_dir: str | None = Field(
        default=None,
        description="With a repo id as --model: download it to DIR/<repo>/<revision> (e.g. a volume) instead of "
        "the Hugging Face cache; complete files already there are kept.",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer path or repo id; default: the model's."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs (or CPU ranks) to split each layer over."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="Pipeline stages to split the layers over."
    )
    dtype: str = Field(
        default="auto", description="Weight/activation dtype: auto, bfloat16, float16 or float32."
    )
    quantization: str | None = Field(
        default=None, description="Quantization method, e.g. awq; default: from config."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Context length. Default: the model's, capped at 32768 so the KV cache fits one full sequence.",
    )
    gpu_memory_utilization: float = Field(
        default=0.90,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may use; on CPU, the fraction of host memory that must be free at startup.",
    )
    kv_cache_space_gib: float | None = Field(
        default=None,
        gt=0,
        description="KV cache size in GiB. Default: from --gpu-memory-utilization on GPUs; 4 GiB on CPU "
        "(or VLLM_CPU_KVCACHE_SPACE).",
    )
    seed: int = Field(default=0, description="Engine random seed.")
    trust_remote_code: bool = Field(default=False, description="Allow the model repo's own Python code.")

    @field_validator(
        "served_model_name", "hidden_model_aliases", "lora_modules", "lora_adapter_dirs", mode="before"
    )
    @classmethod
    def _split_model_lists(cls, v: object) -> object:
        return split_commas(v)

    @field_validator("lora_modules")
    @classmethod
    def _check_lora_modules(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for item in v:
            name, path = lora_module(item)
            if name in seen:
                raise ValueError(f"adapter name {name!r} is given twice")
            seen.add(name)
            if problem := adapter_dir_problem(path):
                raise ValueError(f"{name}: {problem}")
        return v

    @model_validator(mode="after")
    def _adapters_apart_from_model_names(self) -> ModelSettings:
        for name in self.adapters:
            if name in self.base_model_names:
                raise ValueError(
                    f"--lora-modules: the adapter name {name!r} is already a name of the base model"
                )
        return self

    @property
    def model_name(self) -> str:
        """The name served on /v1/models: the flag, else the last path component of the model."""
        return self.served_model_name[0] if self.served_model_name else Path(self.model.rstrip("/")).name

    @property
    def model_aliases(self) -> list[str]:
        """Names listed on /v1/models after the canonical one."""
        return self.served_model_name[1:]

    @property
    def base_model_names(self) -> tuple[str, ...]:
        """Every name a request may use for the base model: canonical, aliases, hidden aliases, its path."""
        return (self.model_name, *self.model_aliases, *self.hidden_model_aliases, self.model)

    @property
    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> path, in the order given."""
        return dict(lora_module(item) for item in self.lora_modules)


class Settings(ModelSettings):
    """Every knob of the server: ModelSettings, then the server's own (listening, keys, limits, probes, logs)."""

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    api_server_count: int = Field(
        default=1,
        ge=1,
        description="Gateway processes sharing the port in front of one engine core (each streams about "
        "13,000 tokens/s on one CPU core); above 1 they share the admission budget, /metrics shows every "
        "process's series, and runtime LoRA loading is refused, as vLLM refuses it.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated in DSV2_API_KEYS); given but empty stops the start.",
    )
    api_key_file: str | None = Field(
        default=None,
        description="YAML/JSON file of named keys with per-key limits (a mounted Secret); see docs/api.md.",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Serve without API keys on an address other than loopback (without keys, the start stops).",
    )
    cache_isolation: bool = Field(
        default=True,
        description="With keys: salt each key's prefix cache with its name, so keys never share KV blocks "
        "(off: --no-cache-isolation).",
    )
    max_request_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Server-wide deadline of a generation request, queueing included (504 after); a request may "
        "ask for less with the X-Request-Timeout header.",
    )
    force_include_usage: bool = Field(
        default=False, description="End every stream with a usage chunk, whatever the request asks (billing)."
    )
    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint for OpenTelemetry traces (e.g. http://otel-collector:4318/v1/traces); "
        "off when unset.",
    )
    max_inflight_sequences: int = Field(
        default=256,
        ge=1,
        description="Admission budget: sequences (prompts x n) of all generation requests in flight; a request "
        "that would exceed it gets 429 with Retry-After.",
    )
    max_sequences_per_request: int = Field(
        default=256,
        ge=1,
        description="Most sequences (prompts x n) one request may ask for (400 above); capped by "
        "--max-inflight-sequences.",
    )
    max_buffered_tokens: int = Field(
        default=1 << 20,
        ge=1,
        description="Largest non-streamed result, in token entries: n x max_tokens x (1 + top_logprobs) summed "
        "over prompts (400 above; streamed requests are not buffered).",
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request body (413 above)."
    )
    max_stop_sequences: int = Field(
        default=16,
        ge=1,
        description="Most stop strings (`stop`, `stop_sequences`) one request may give (400 above).",
    )
    max_stop_length: int = Field(
        default=256, ge=1, description="Longest stop string, in characters (400 above)."
    )
    max_tools: int = Field(default=128, ge=1, description="Most tools one request may give (400 above).")
    max_tool_description_length: int = Field(
        default=16384, ge=1, description="Longest tool description, in characters (400 above)."
    )
    max_schema_nodes: int = Field(
        default=10000,
        ge=1,
        description="Most subschemas in one request's JSON schemas (tool parameters and response formats, "
        "counted together; 400 above).",
    )
    max_schema_depth: int = Field(
        default=32, ge=1, description="Deepest nesting of subschemas in a JSON schema (400 above)."
    )
    max_schema_properties: int = Field(
        default=5000, ge=1, description="Most object properties in one request's JSON schemas (400 above)."
    )
    max_schema_enum_values: int = Field(
        default=1000,
        ge=1,
        description="Most enum and const values in one request's JSON schemas (400 above).",
    )
    max_schema_optional_properties: int = Field(
        default=512,
        ge=0,
        description="Most object properties not listed in their object's `required`, in one request's JSON schemas "
        "(the engine's grammar compile grows fast with them; 400 above).",
    )
    max_schema_pattern_repeat: int = Field(
        default=1024,
        ge=1,
        description="Largest repetition a `pattern` may spell (a{m,n}, nested ones multiplied; 400 above).",
    )
    max_schema_branches: int = Field(
        default=1000,
        ge=1,
        description="Most anyOf/oneOf/allOf branches in one request's JSON schemas (400 above).",
    )
    stream_send_timeout: float = Field(
        default=30.0,
        gt=0,
        description="A stream whose client takes no data for this many seconds is aborted and its slot released.",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        description="Tokens per streamed event, as vLLM's --stream-interval: the engine hands a stream's tokens "
        "over once N have come (the first and the last at once), as one SSE event with their text, logprobs and "
        "tool-call deltas; the same text in fewer events, for less front-end CPU per token (docs/benchmarks.md). "
        "A stream that falls behind gets what it missed in one event whatever N is.",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="Most open HTTP connections (uvicorn's limit_concurrency); beyond it requests get 503, "
        "probes and /metrics excepted.",
    )
    header_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client may take to send a request's headers once it has started (slow clients "
        "are disconnected).",
    )
    body_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a client may take to send a request's body (408 after).",
    )
    drain_timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds in-flight requests may finish after SIGTERM before they are aborted.",
    )
    readiness_window_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A generation that succeeded (a served request, or a probe while idle) keeps the pod ready "
        "this long; while busy, an engine step within it does too.",
    )
    liveness_stall_seconds: float = Field(
        default=120.0,
        gt=0,
        description="/health fails when the engine has unfinished requests and has made no step for this long.",
    )
    timeout_keep_alive: int = Field(
        default=75,
        ge=1,
        description="Seconds an idle HTTP keep-alive connection stays open; keep it above the proxy's (often 60).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Allowed CORS origins (comma-separated, or *); empty = CORS off."
    )
    cors_methods: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["GET", "POST", "OPTIONS"],
        description="Allowed CORS methods (comma-separated).",
    )
    cors_headers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "Authorization",
            "Content-Type",
            "X-Request-Id",
            "X-Request-Timeout",
            "x-api-key",
            "anthropic-version",
            "traceparent",
            "tracestate",
        ],
        description="Allowed CORS request headers (comma-separated).",
    )
    batch_dir: str | None = Field(
        default=None,
        description="Directory of the Batch API's files (files/) and, by default, its SQLite database "
        "(batches.db); default: dsv2-batches beside the Hugging Face cache ($HF_HOME/..), the model volume.",
    )
    batch_store: str | None = Field(
        default=None,
        description="Database of batch and file metadata, an SQLAlchemy URL: postgresql://user:pass@host/db for "
        "several replicas (they share batches through leases); default: sqlite:///<--batch-dir>/batches.db.",
    )
    batch_priority: int = Field(
        default=100,
        description="Engine priority of batch lines (lower runs first; live requests default to 0); needs "
        "--scheduling-policy priority.",
    )
    batch_max_sequences: int = Field(
        default=4,
        ge=1,
        description="Most sequences of batch lines in flight at once while no live request is (see "
        "--batch-busy-max-sequences), counted inside --max-inflight-sequences.",
    )
    batch_busy_max_sequences: int = Field(
        default=0,
        ge=0,
        description="The cap on batch sequences in flight while live requests are in flight (the batch takes "
        "spare capacity: --batch-max-sequences only while no live request runs); 0: no batch line starts while "
        "a live request runs (those running finish).",
    )
    batch_fifo_max_sequences: int = Field(
        default=2,
        ge=1,
        description="The cap on batch sequences in flight when the engine schedules first come, first served "
        "(no --scheduling-policy priority): batch lines cannot yield to live ones there.",
    )
    batch_counts_toward_limits: bool = Field(
        default=False,
        description="Charge batch lines to their key's requests and tokens per minute (default: batches are the "
        "cheap lane, counted only in the key's usage metrics).",
    )
    batch_max_file_bytes: int = Field(
        default=200 * 1024 * 1024, ge=1024, description="Largest file uploaded to /v1/files (413 above)."
    )
    batch_max_stored_bytes: int | None = Field(
        default=None, ge=1, description="Most bytes of files one key may store (uploads and batch results)."
    )
    batch_max_open_batches: int | None = Field(
        default=None, ge=1, description="Most batches one key may have not yet finished (429 above)."
    )
    batch_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A replica working a batch renews its lease in the database; another replica takes the batch "
        "over once the lease has lapsed this long.",
    )
    batch_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often the batch worker looks for work, renews its lease and "
        "checks for cancels and expiry.",
    )
    rate_limit_store: str | None = Field(
        default=None,
        description="Redis holding every key's limits (requests and tokens per minute, max_sequences) for all "
        "gateway processes and replicas: redis://[:password@]host:port/db, rediss:// (TLS) or "
        "unix:///path/redis.sock?db=N. Default: each process counts on its own, so a key's limits multiply by "
        "processes x replicas.",
    )
    rate_limit_failure: Literal["open", "closed"] = Field(
        default="open",
        description="What a request of a key with limits gets while --rate-limit-store cannot be reached: open "
        "serves it uncounted, closed refuses it (503, Retry-After). Keys without limits are served either way.",
    )
    rate_limit_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="With --rate-limit-store: a request's sequences are a lease of this many seconds, renewed "
        "while it runs; the sequences of a gateway that died are free again this long after.",
    )
    playground: bool = Field(
        default=True,
        description="Serve the browser chat playground on / and /playground (off: --no-playground).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_format: Literal["text", "json"] = Field(default="text", description="Access and app log format.")
    engine_args: list[str] = Field(
        default_factory=list, description="Extra vLLM engine arguments, as on vLLM's command line."
    )

    @field_validator("api_keys", "cors_origins", "cors_methods", "cors_headers", mode="before")
    @classmethod
    def _split_server_lists(cls, v: object) -> object:
        return split_commas(v)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_given_not_empty(cls, v: object) -> object:
        # Runs before _split_server_lists (before-validators run last-defined first), on the raw value. The
        # default ([]) is validated too; a given value is a string (flag, variable) or a list from code, and
        # one that holds no key (e.g. an empty value in a Secret) would turn auth off.
        if v != [] and split_commas(v) == []:
            raise ValueError("given (flag or DSV2_API_KEYS) but holds no key; unset it to serve without keys")
        return v

    @field_validator("api_key_file")
    @classmethod
    def _key_file_given_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("given (flag or DSV2_API_KEY_FILE) but empty; unset it to serve without keys")
        return v

    @field_validator("rate_limit_store")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and v.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ValueError(
                "expected a Redis URL: redis://host:port/db, rediss://host:port/db or unix:///path/redis.sock"
            )
        return v


def split_commas(v: object) -> object:
    """A comma-separated flag or variable -> its list; repeated or space-separated flag values may each hold a
    comma list (a JSON object is one value)."""
    if isinstance(v, str):
        return [part.strip() for part in v.split(",") if part.strip()]
    if isinstance(v, list):
        return [
            part.strip()
            for item in v
            for part in ([str(item)] if str(item).lstrip().startswith("{") else str(item).split(","))
            if part.strip()
        ]
    return v


def lora_module(item: str) -> tuple[str, str]:
    """One --lora-modules value -> (name, path): `name=path`, or vLLM's JSON form {"name": ..., "path": ...}.
    The JSON form's `base_model_name` is accepted and not used: every adapter adapts the one base model, which
    /v1/models gives as its parent."""
    if item.lstrip().startswith("{"):
        try:
            spec = json.loads(item)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{item!r} is not JSON: {exc}") from None
        unknown = set(spec) - {"name", "path", "base_model_name"}
        if unknown or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise ValueError(f'{item!r}: the JSON form is {{"name": ..., "path": ...}}')
        name, path = spec["name"], spec["path"]
    else:
        name, _, path = item.partition("=")
    if not name.strip() or not path.strip():
        raise ValueError(f"{item!r} is not name=path")
    return name, path


def adapter_dir_problem(path: str) -> str | None:
    """Why `path` cannot be a LoRA adapter, or None. A path that is not local is left to vLLM as a repo id."""
    where = Path(path).expanduser()
    local = where.exists() or path.startswith(("/", ".", "~"))
    if local and not (where / "adapter_config.json").is_file():
        return f"{path} is not a peft adapter directory (no adapter_config.json)"
    return None


# flag name -> Settings field; flags default to None so that unset flags fall back to env/defaults.
_FLAGS: list[tuple[str, dict]] = [
    ("--model", {}),
    ("--served-model-name", {}),
    ("--hidden-model-aliases", {}),
    ("--lora-modules", {"nargs": "+", "action": "extend"}),
    ("--allow-runtime-lora-updating", {"action": "store_const", "const": True}),
    ("--lora-adapter-dirs", {}),
    ("--allow-lora-hub-ids", {"action": "store_const", "const": True}),
    ("--max-runtime-adapters", {"type": int}),
    ("--revision", {}),
    ("--download-dir", {}),
    ("--tokenizer", {}),
    ("--tensor-parallel-size", {"type": int}),
    ("--pipeline-parallel-size", {"type": int}),
    ("--dtype", {}),
    ("--quantization", {}),
    ("--max-model-len", {"type": int}),
    ("--gpu-memory-utilization", {"type": float}),
    ("--kv-cache-space-gib", {"type": float}),
    ("--seed", {"type": int}),
    ("--trust-remote-code", {"action": "store_const", "const": True}),
    ("--host", {}),
    ("--port", {"type": int}),
    ("--api-server-count", {"type": int}),
    ("--api-keys", {}),
    ("--api-key-file", {}),
    ("--allow-unauthenticated", {"action": "store_const", "const": True}),
    ("--max-request-seconds", {"type": float}),
    ("--force-include-usage", {"action": "store_const", "const": True}),
    ("--otlp-traces-endpoint", {}),
    ("--max-inflight-sequences", {"type": int}),
    ("--max-sequences-per-request", {"type": int}),
    ("--max-buffered-tokens", {"type": int}),
    ("--max-request-bytes", {"type": int}),
    ("--max-stop-sequences", {"type": int}),
    ("--max-stop-length", {"type": int}),
    ("--max-tools", {"type": int}),
    ("--max-tool-description-length", {"type": int}),
    ("--max-schema-nodes", {"type": int}),
    ("--max-schema-depth", {"type": int}),
    ("--max-schema-properties", {"type": int}),
    ("--max-schema-enum-values", {"type": int}),
    ("--max-schema-optional-properties", {"type": int}),
    ("--max-schema-pattern-repeat", {"type": int}),
    ("--max-schema-branches", {"type": int}),
    ("--stream-send-timeout", {"type": float}),
    ("--stream-interval", {"type": int}),
    ("--max-connections", {"type": int}),
    ("--header-timeout", {"type": float}),
    ("--body-timeout", {"type": float}),
    ("--drain-timeout", {"type": float}),
    ("--readiness-window-seconds", {"type": float}),
    ("--liveness-stall-seconds", {"type": float}),
    ("--timeout-keep-alive", {"type": int}),
    ("--batch-dir", {}),
    ("--batch-store", {}),
    ("--batch-priority", {"type": int}),
    ("--batch-max-sequences", {"type": int}),
    ("--batch-busy-max-sequences", {"type": int}),
    ("--batch-fifo-max-sequences", {"type": int}),
    ("--batch-counts-toward-limits", {"action": "store_const", "const": True}),
    ("--batch-max-file-bytes", {"type": int}),
    ("--batch-max-stored-bytes", {"type": int}),
    ("--batch-max-open-batches", {"type": int}),
    ("--batch-lease-seconds", {"type": float}),
    ("--batch-poll-seconds", {"type": float}),
    ("--rate-limit-store", {}),
    ("--rate-limit-failure", {"choices": ["open", "closed"]}),
    ("--rate-limit-lease-seconds", {"type": float}),
    ("--cors-origins", {}),
    ("--cors-methods", {}),
    ("--cors-headers", {}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
    ("--log-format", {"choices": ["text", "json"]}),
]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, kwargs in _FLAGS:
        field = flag[2:].replace("-", "_")
        info = Settings.model_fields[field]
        env = f"DSV2_{field.upper()}"
        parser.add_argument(flag, dest=field, default=None, help=f"{info.description} [env {env}]", **kwargs)
    # Short aliases users of vLLM know.
    parser.add_argument("-tp", dest="tensor_parallel_size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api-key", dest="api_keys", default=None, help="Same as --api-keys.")
    parser.add_argument(
        "--no-playground",
        dest="playground",
        action="store_const",
        const=False,
        default=None,
        help=f"{Settings.model_fields['playground'].description} [env DSV2_PLAYGROUND=false]",
    )
    parser.add_argument(
        "--no-cache-isolation",
        dest="cache_isolation",
        action="store_const",
        const=False,
        default=None,
        help=f"{Settings.model_fields['cache_isolation'].description} [env DSV2_CACHE_ISOLATION=false]",
    )
    parser.add_argument(  # the earlier name, when the budget counted requests
        "--max-concurrent-requests",
        dest="max_inflight_sequences",
        type=int,
        default=None,
        help=argparse.SUPPRESS,
    )


def settings_from_args(ns: argparse.Namespace, engine_args: list[str]) -> Settings:
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}
    if engine_args:
        given["engine_args"] = engine_args
    return Settings(**given)
