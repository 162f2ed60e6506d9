"""Validate response bodies against OpenAI's own published OpenAPI document.

The reference is ``../shared/openai-openapi/openapi.json`` (openai/openai-openapi, unchanged; see its README).
It is OpenAPI 3.1 but still marks nullable fields with the OpenAPI 3.0 keyword ``nullable: true``, which a
JSON-Schema validator ignores. Before validating, every schema under ``components.schemas`` is converted:

* ``nullable: true`` beside ``type`` (and nothing that composes other schemas): ``"null"`` is added to
  ``type`` and, when there is an ``enum``, ``None`` is added to the ``enum``;
* ``nullable: true`` beside ``$ref`` / ``allOf`` / ``anyOf`` / ``oneOf`` / ``not`` / ``const``: the schema
  becomes ``{"anyOf": [<schema without nullable>, {"type": "null"}]}``;
* ``nullable: true`` beside an ``enum`` without ``type``: ``None`` is added to the ``enum``;
* ``nullable: true`` with no constraint beside it (it already accepts ``null``) and ``nullable: false``:
  the keyword is dropped.

Nothing else is changed or relaxed: validation uses jsonschema's Draft 2020-12 validator, references to
``#/components/schemas/...`` are resolved through a :mod:`referencing` registry holding the converted
document, and ``format`` is not asserted (``unixtime`` is not a JSON-Schema format anyway).

Usage in tests::

    from tests import openai_schema

    openai_schema.require_spec()          # pytest.skip when ../shared is absent (a failure under CI=true)
    openai_schema.chat_completion(body)   # AssertionError with a readable message when invalid

The one deliberate, named deviation is :func:`completion_chunk` (see its docstring); :func:`completion`
itself is the spec, unchanged.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH: Path = Path(__file__).resolve().parents[1].parent / "shared" / "openai-openapi" / "openapi.json"

_BASE_URI = "urn:openai-openapi"

# Names under components.schemas used by the wrappers below (checked against the document).
CHAT_COMPLETION = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION = "CreateCompletionResponse"
MODEL_LIST = "ListModelsResponse"
MODEL = "Model"
ERROR = "ErrorResponse"

# Not in the document: CreateCompletionResponse with choices[].finish_reason made nullable (completion_chunk).
_COMPLETION_CHUNK = "dsv2-serve:CreateCompletionResponse+nullable-finish_reason"

# Keywords whose value is one subschema / a list of subschemas / a mapping of name -> subschema.
_SUBSCHEMA = (
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "additionalItems",
    "contentSchema",
    "items",
)
_SUBSCHEMA_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# With one of these beside `nullable`, adding "null" to `type` is not enough: wrap in anyOf instead.
_COMPOSING = ("$ref", "$dynamicRef", "allOf", "anyOf", "oneOf", "not", "const", "if")


def available() -> bool:
    """Whether OpenAI's OpenAPI document is there to check against. Under CI (CI=true) it must be: a missing
    document fails the test (scripts/fetch-references.sh fetches it where ../shared is absent)."""
    if SPEC_PATH.is_file():
        return True
    if os.environ.get("CI") == "true":
        pytest.fail(f"OpenAI's OpenAPI document not found at {SPEC_PATH}: run scripts/fetch-references.sh")
    return False


def require_spec() -> None:
    """Skip the calling test when OpenAI's OpenAPI document is not there (fail under CI)."""
    if not available():
        pytest.skip(f"OpenAI's OpenAPI document not found at {SPEC_PATH} (../shared is absent)")


def convert_nullable(schema: Any) -> Any:
    """Return a copy of an OpenAPI schema with every ``nullable`` turned into JSON-Schema ``null``."""
    if not isinstance(schema, dict):
        return schema  # `true` / `false` schemas
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: convert_nullable(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            out[key] = [convert_nullable(sub) for sub in value]
        elif key in _SUBSCHEMA and isinstance(value, dict | bool):
            out[key] = convert_nullable(value)
        else:
            out[key] = value  # enum, const, default, example, required, ...: data, copied as is
    nullable = out.pop("nullable", False)
    if nullable is not True:
        return out
    if any(key in out for key in _COMPOSING):
        return {"anyOf": [out, {"type": "null"}]}
    if "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        if "null" not in types:
            out["type"] = [*types, "null"]
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


@functools.cache
def converted_schemas() -> dict[str, Any]:
    """``components.schemas`` of the document, converted by :func:`convert_nullable` (cached)."""
    with SPEC_PATH.open(encoding="utf-8") as f:
        document = json.load(f)
    schemas = {name: convert_nullable(schema) for name, schema in document["components"]["schemas"].items()}
    # The explicit, documented deviation used by completion_chunk(); everything else stays the spec's.
    chunk = copy.deepcopy(schemas[COMPLETION])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["type"] = [finish["type"], "null"]
    finish["enum"] = [*finish["enum"], None]
    schemas[_COMPLETION_CHUNK] = chunk
    return schemas


@functools.cache
def _registry() -> Registry:
    document = {"components": {"schemas": converted_schemas()}}
    return Registry().with_resource(_BASE_URI, Resource(contents=document, specification=DRAFT202012))


@functools.cache
def _validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in converted_schemas():
        raise KeyError(f"no schema {schema_name!r} in components.schemas of {SPEC_PATH}")
    ref = {"$ref": f"{_BASE_URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(ref, registry=_registry())


def validate(schema_name: str, instance: object) -> None:
    """Validate ``instance`` against ``components.schemas[schema_name]``; AssertionError when invalid."""
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    best = best_match(errors)
    assert best is not None
    schema_path = "/".join(str(part) for part in best.absolute_schema_path)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    # For anyOf/oneOf failures, say why each alternative failed (the leaves, deepest first).
    why = "".join(f"\n    - {leaf.message} at {leaf.json_path}" for leaf in _leaves(best)[:8])
    raise AssertionError(
        f"not a valid OpenAI {schema_name}{more}: {best.message}\n"
        f"  at {best.json_path}\n"
        f"  schema path: {schema_path}"
        + (f"\n  because:{why}" if why else "")
        + f"\n  instance: {json.dumps(instance, default=repr)[:2000]}"
    )


def _leaves(error: ValidationError) -> list[ValidationError]:
    leaves = [leaf for sub in error.context for leaf in (_leaves(sub) if sub.context else [sub])]
    return sorted(leaves, key=lambda leaf: -len(leaf.absolute_path))


def chat_completion(body: object) -> None:
    """A non-streamed ``POST /v1/chat/completions`` body: ``CreateChatCompletionResponse``."""
    validate(CHAT_COMPLETION, body)


def chat_chunk(chunk: object) -> None:
    """One streamed chat SSE chunk (decoded ``data:`` JSON): ``CreateChatCompletionStreamResponse``."""
    validate(CHAT_CHUNK, chunk)


def completion(body: object) -> None:
    """A ``POST /v1/completions`` body, or a streamed chunk: ``CreateCompletionResponse``, as published.

    The document says streamed and non-streamed completion objects share this shape, but it makes
    ``choices[].finish_reason`` a non-nullable enum, so an intermediate chunk carrying
    ``"finish_reason": null`` (what OpenAI's API and vLLM actually stream) fails here: use
    :func:`completion_chunk` for those.
    """
    validate(COMPLETION, body)


def completion_chunk(chunk: object) -> None:
    """One streamed legacy-completion chunk: ``CreateCompletionResponse`` with a nullable finish_reason.

    The only difference from :func:`completion` is that ``choices[].finish_reason`` may also be ``null``
    (intermediate chunks); any other value still has to be ``stop``/``length``/``content_filter``, and
    every other field is checked exactly as published. Validate the last chunk with :func:`completion`.
    """
    validate(_COMPLETION_CHUNK, chunk)


def model_list(body: object) -> None:
    """A ``GET /v1/models`` body: ``ListModelsResponse``."""
    validate(MODEL_LIST, body)


def model(body: object) -> None:
    """A ``GET /v1/models/{model}`` body: ``Model``."""
    validate(MODEL, body)


def error(body: object) -> None:
    """An error body ``{"error": {...}}``: ``ErrorResponse``."""
    validate(ERROR, body)
