"""The JSON schemas a request carries (tool parameters, response formats): bounded, then checked.

Every schema of one request counts against one budget (subschemas, nesting depth, object properties, enum and
const values, anyOf/oneOf/allOf branches), measured by an iterative walk before anything else reads the schema,
so neither jsonschema's recursive check nor the engine's grammar compiler ever sees a schema larger than the
server allows. Each limit is a flag; going over it is a 400 naming the parameter, the limit and the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.gateway.errors import APIError

# Keywords whose value is one subschema, a list of subschemas, or a map of names to subschemas (JSON Schema
# 2020-12 and draft 7); every other keyword holds data (enum, const, default, ...) that is not walked.
_ONE = {
    "additionalProperties", "additionalItems", "contains", "else", "if", "items", "not", "propertyNames",
    "then", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
}  # fmt: skip
_MANY = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}
_MAP = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_BRANCHES = ("anyOf", "oneOf", "allOf")


@dataclass(frozen=True)
class SchemaLimits:
    nodes: int  # --max-schema-nodes
    depth: int  # --max-schema-depth
    properties: int  # --max-schema-properties
    enum_values: int  # --max-schema-enum-values
    branches: int  # --max-schema-branches
    optional_properties: int = 512  # --max-schema-optional-properties
    pattern_repeat: int = 1024  # --max-schema-pattern-repeat


class SchemaBudget:
    """One request's schema budget: `check` each schema it carries in turn."""

    def __init__(self, limits: SchemaLimits) -> None:
        self.limits = limits
        self.nodes = self.properties = self.enum_values = self.branches = self.optional = 0

    def check(self, schema: dict, param: str) -> None:
        """400 naming `param` when the schema takes the request over a limit, or is not a valid JSON schema."""
        self._measure(schema, param)
        from jsonschema import SchemaError
        from jsonschema.validators import validator_for

        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            raise APIError(f"{param} is not a valid JSON schema: {exc.message}", param=param) from None

    def _measure(self, schema: dict, param: str) -> None:
        lim = self.limits
        stack: list[tuple[object, int]] = [(schema, 1)]
        while stack:
            node, depth = stack.pop()
            self.nodes += 1
            _over(self.nodes, lim.nodes, "subschemas", "--max-schema-nodes", param)
            if not isinstance(node, dict):
                continue  # true / false (or a value the schema check refuses)
            _over(depth, lim.depth, "levels of nesting", "--max-schema-depth", param)
            for key, value in node.items():
                if key in _MAP and isinstance(value, dict):
                    if key == "properties":
                        required = node.get("required")
                        required = set(required) if isinstance(required, list) else set()
                        self.optional += sum(1 for name in value if name not in required)
                        _over(
                            self.optional,
                            lim.optional_properties,
                            "optional object properties (not in `required`)",
                            "--max-schema-optional-properties",
                            param,
                        )
                    if key == "patternProperties":
                        for pattern in value:
                            _check_pattern(pattern, lim.pattern_repeat, param)
                    if key != "$defs" and key != "definitions":
                        self.properties += len(value)
                        _over(
                            self.properties,
                            lim.properties,
                            "object properties",
                            "--max-schema-properties",
                            param,
                        )
                    stack.extend((v, depth + 1) for v in value.values())
                elif key in _MANY and isinstance(value, list):
                    if key in _BRANCHES:
                        self.branches += len(value)
                        _over(
                            self.branches,
                            lim.branches,
                            "anyOf/oneOf/allOf branches",
                            "--max-schema-branches",
                            param,
                        )
                    stack.extend((v, depth + 1) for v in value)
                elif key in _ONE and isinstance(value, dict | bool):
                    stack.append((value, depth + 1))
                elif key == "enum" and isinstance(value, list):
                    self.enum_values += len(value)
                elif key == "const":
                    self.enum_values += 1
                elif key == "pattern" and isinstance(value, str):
                    _check_pattern(value, lim.pattern_repeat, param)
            _over(
                self.enum_values, lim.enum_values, "enum and const values", "--max-schema-enum-values", param
            )


def _check_pattern(pattern: str, limit: int, param: str) -> None:
    """400 when the pattern spells a repetition above `limit` (nested bounded repeats multiplied): the engine
    compiles each one out into its grammar."""
    if "{" not in pattern:
        return
    import re._parser as sre

    try:
        parsed = sre.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return  # not Python's regex dialect: the schema check or the engine judges it
    if (repeat := _repeat(parsed)) > limit:
        raise APIError(
            f"{param}: the pattern {pattern[:80]!r} repeats up to {repeat} times; this server allows at most "
            f"{limit} (--max-schema-pattern-repeat)",
            param=param,
            code="schema_too_large",
        )


def _repeat(parsed) -> int:
    """How many times a parsed pattern's bounded repeats spell their contents out: nested repeats multiply,
    repeats one after another (or in alternatives) add up; 1 for a pattern without any."""
    import re._constants as c

    total = 0
    for op, arg in parsed:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, high, sub = arg
            total += max(low if high == c.MAXREPEAT else high, 1) * _repeat(sub)
        elif op == c.SUBPATTERN:
            total += _inner(_repeat(arg[-1]))
        elif op == c.BRANCH:
            total += sum(_inner(_repeat(branch)) for branch in arg[1])
        elif op in (c.ASSERT, c.ASSERT_NOT, c.ATOMIC_GROUP):
            total += _inner(_repeat(arg[-1]))
    return max(total, 1)


def _inner(repeat: int) -> int:
    return repeat if repeat > 1 else 0


def _over(count: int, limit: int, what: str, flag: str, param: str) -> None:
    if count > limit:
        raise APIError(
            f"{param}: this request's JSON schemas have more than {limit} {what}, this server's limit "
            f"({flag})",
            param=param,
            code="schema_too_large",
        )
