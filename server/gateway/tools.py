"""Tool calls in DeepSeek-V2 chat: the format, the grammar that guarantees it, and parsing the model's text.

The format (rendered into prompts by server/data/deepseek_v2_tools_chat_template.jinja, and what the model writes):

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

The guarantee comes from vLLM's structured outputs (an xgrammar structural tag), never from hoping the text
parses: once the model writes `<tool_call>`, the grammar allows only `{"name":"<one of the request's tools>",
"arguments":` followed by JSON valid for that tool's `parameters` schema (at most one blank between tokens: no
padding), then `}</tool_call>`. `auto` leaves the model free to answer in text instead; `required` and a
named choice make the output nothing but calls; `parallel_tool_calls: false` stops after the first call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# JSON whitespace allowed between tokens of the arguments: enough for readable JSON, too little to pad with.
MAX_WHITESPACE = 1


def call_prefix(name: str) -> str:
    return OPEN + '{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":'


def render_call(name: str, arguments: str) -> str:
    """One call as the template writes it (arguments: compact JSON text)."""
    return f"{call_prefix(name)}{arguments}}}{CLOSE}"


def _json(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_WHITESPACE}


def json_tag(schema: dict) -> str:
    """JSON valid for `schema` and nothing else (response_format), padding bounded as in tool arguments."""
    return _tag(_json(schema))


def structural_tag(tools: list[dict], choice: str | None, parallel: bool, answer: dict | None = None) -> str:
    """The structural tag for `tools` ({"name", "parameters"}) under tool_choice `choice`: "auto", "required",
    or the name of one function. `answer`, a response format's JSON schema, governs the text answer: under
    "auto" the output is either calls or JSON valid for it; a forced call writes no text, so it changes nothing
    there (as at OpenAI)."""
    named = choice not in ("auto", "required")
    chosen = [t for t in tools if t["name"] == choice] if named else tools
    tags = [
        {
            "type": "tag",
            "begin": call_prefix(t["name"]),
            "content": {
                "type": "json_schema",
                "json_schema": t["parameters"],
                "max_whitespace_cnt": MAX_WHITESPACE,
            },
            "end": "}" + CLOSE,
        }
        for t in chosen
    ]
    if choice == "auto" and answer is not None:
        return _tag({"type": "or", "elements": [_calls_only(tags, not parallel), _json(answer)]})
    if choice == "auto":
        fmt: dict = {
            "type": "triggered_tags",
            "triggers": [OPEN],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not parallel,
        }
    else:
        fmt = _calls_only(tags, named or not parallel)
    return _tag(fmt)


def _calls_only(tags: list[dict], one: bool) -> dict:
    """Only calls: after the assistant's "Assistant:" one blank (as the template writes the turn), then one
    call (`one`: a named choice, or parallel calls off) or several."""
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True}
    return {
        "type": "sequence",
        "elements": [{"type": "const_string", "value": " "}, {**calls, "stop_after_first": one}],
    }


def _tag(fmt: dict) -> str:
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def body(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Event:
    kind: (
        str  # "content" | "call" (a call starts: call_id, name) | "arguments" (a fragment of the last call's)
    )
    text: str = ""
    name: str = ""
    call_id: str = ""
    index: int = 0


class CallParser:
    """Incremental: model text in, content and tool-call events out, as a stream must send them.

    Text that might be the start of `<tool_call>` is held back until it is known; a call is announced once its
    name is known; its arguments are sent as they come, up to the end of their JSON value (tracked as it is
    written, so nothing is held back and the closing `}</tool_call>` never becomes arguments: a call cut short
    by max_tokens carries exactly the argument text written so far, a prefix of JSON). Trailing blanks are held
    until more text follows them, so the blanks around calls (the template's " " after "Assistant:", newlines
    between calls) never become content; the result does not depend on how the text was cut into pieces.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.blank = ""
        self.in_call = False
        self.announced = False
        self.arguments: _JSONValue | None = None  # the call's arguments while they are being written
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        return self._content_held(self._feed(text))

    def _content_held(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            if event.kind == "call":
                self.blank = ""  # blanks before a call are layout, not content
                out.append(event)
            elif event.kind != "content":
                out.append(event)
            else:
                text = self.blank + event.text
                kept = text.rstrip()
                self.blank = text[len(kept) :]
                if kept:
                    out.append(Event("content", kept))
        return out

    def _feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while True:
            if not self.in_call:
                start = self.buffer.find(OPEN)
                if start < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    if len(self.buffer) > keep:
                        events.append(Event("content", self.buffer[: len(self.buffer) - keep]))
                        self.buffer = self.buffer[len(self.buffer) - keep :]
                    return events
                if start:
                    events.append(Event("content", self.buffer[:start]))
                self.buffer = self.buffer[start + len(OPEN) :]
                self.in_call, self.announced = True, False
            if not self.announced:
                head = _HEAD.match(self.buffer)
                if head is None:
                    return events
                name = json.loads(f'"{head.group(1)}"')
                events.append(Event("call", name=name, call_id=new_call_id(), index=self.calls))
                self.calls += 1
                self.buffer = self.buffer[head.end() :]
                self.announced = True
                self.arguments = _JSONValue()
            if self.arguments is not None:
                end = self.arguments.end(self.buffer)
                written = self.buffer if end is None else self.buffer[:end]
                if written:
                    events.append(Event("arguments", written, index=self.calls - 1))
                self.buffer = self.buffer[len(written) :]
                if end is None:
                    return events
                self.arguments = None
            # the arguments are whole: what follows is the call's `}</tool_call>`
            rest = self.buffer.lstrip()
            if rest.startswith(_CALL_END):
                self.buffer = rest[len(_CALL_END) :]
                self.in_call = False
            elif _CALL_END.startswith(rest):
                return events
            else:  # not the grammar's output: the call ends at its arguments, the rest is text
                self.in_call = False

    def close(self) -> list[Event]:
        """The end of the output: text held back is sent as it is; in a call cut short, the arguments already
        sent are all it has (the partial name of a call not yet announced, or a partial `}</tool_call>`, is not
        content)."""
        rest, self.buffer = self.buffer, ""
        events = self._content_held([Event("content", rest)] if rest and not self.in_call else [])
        if self.blank and not self.calls and not self.in_call:  # a plain answer keeps its blanks
            events.append(Event("content", self.blank))
        self.blank = ""
        return events


_CALL_END = "}" + CLOSE


class _JSONValue:
    """Where one JSON value ends, in text given piece by piece (each character is read once)."""

    def __init__(self) -> None:
        self.started = False
        self.scalar = False  # a number, true, false or null: it ends where a delimiter starts
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end(self, text: str) -> int | None:
        """The offset in `text` just past the value's end, or None if the value goes on past `text`."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif not self.started:
                if ch in " \t\n\r":
                    continue
                self.started = True
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth = 1
                else:
                    self.scalar = True
            elif self.scalar:
                if ch in ",}] \t\n\r":
                    return i
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
