"""Every path the gateway serves, named once: the routes, the metrics' route labels, the request-rate limit and
the request timers all read them from here."""

from __future__ import annotations

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
MODELS = "/v1/models"
MODEL = "/v1/models/{model_id:path}"
LOAD_LORA = "/v1/load_lora_adapter"
UNLOAD_LORA = "/v1/unload_lora_adapter"
HEALTH = "/health"
READY = "/ready"
METRICS = "/metrics"
VERSION = "/version"
# The Batch API (server.batch): files, and batches of requests run on spare capacity.
FILES = "/v1/files"
FILE = "/v1/files/{file_id}"
FILE_CONTENT = "/v1/files/{file_id}/content"
BATCHES = "/v1/batches"
BATCH = "/v1/batches/{batch_id}"
BATCH_CANCEL = "/v1/batches/{batch_id}/cancel"

# What a key's requests_per_minute counts: each request that reads the model's tokenizer or engine.
RATE_LIMITED = frozenset({CHAT, COMPLETIONS, RESPONSES, MESSAGES, COUNT_TOKENS})
# Paths with a metrics label of their own; "/v1/models/{model}" for every model card, "other" for the rest
# (bounded label cardinality).
LABELLED = frozenset(
    {
        CHAT,
        COMPLETIONS,
        RESPONSES,
        MESSAGES,
        COUNT_TOKENS,
        MODELS,
        LOAD_LORA,
        UNLOAD_LORA,
        HEALTH,
        READY,
        METRICS,
        VERSION,
        FILES,
        BATCHES,
    }
)
MODEL_LABEL = "/v1/models/{model}"


def label(path: str) -> str:
    """A request path -> its metrics `route` label."""
    if path in LABELLED:
        return path
    return MODEL_LABEL if path.startswith(MODELS + "/") else "other"


def anthropic(path: str) -> bool:
    """Paths whose errors come in Anthropic's shape."""
    return path == MESSAGES or path.startswith(MESSAGES + "/")
