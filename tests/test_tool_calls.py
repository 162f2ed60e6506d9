"""Tool calls in the model's text: server/gateway/tools.py's CallParser, and a call cut short by max_tokens on
every API (over FakeEngine, whose words are the pieces of a call).

A call cut at any point carries exactly the argument text written so far: a prefix of the call's JSON, never
the template's `}</tool_call>` wrapper; streamed deltas add up to the non-streamed arguments.
"""

from __future__ import annotations

import json

import pytest

from server.gateway import tools
from tests.fake_engine import FakeEngine
from tests.test_gateway_http import MODEL, make_client, sse_events

# The arguments hold the wrapper's own text inside a string, and nested braces: only JSON-aware tracking keeps
# them apart from the `}</tool_call>` that ends the call.
ARGUMENTS = '{"city": "Paris", "note": "a}</tool_call> b\\"}", "at": {"x": [1, 2]}}'
CALL = f" {tools.call_prefix('get_weather')}{ARGUMENTS}}}{tools.CLOSE}"


def events_of(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) from feeding `pieces` one at a time, then closing."""
    parser = tools.CallParser()
    content, calls = "", []
    for event in [e for piece in pieces for e in parser.feed(piece)] + parser.close():
        if event.kind == "content":
            content += event.text
        elif event.kind == "call":
            calls.append([event.name, ""])
        else:
            assert event.index == len(calls) - 1
            calls[-1][1] += event.text
    return content, [tuple(c) for c in calls]


def test_whole_call_and_text_around_it():
    assert events_of([CALL]) == ("", [("get_weather", ARGUMENTS)])
    assert json.loads(ARGUMENTS)["note"] == 'a}</tool_call> b"}'
    text = f"Let me check.{CALL}\n{CALL} Done."
    assert events_of([text]) == ("Let me check. Done.", [("get_weather", ARGUMENTS)] * 2)


@pytest.mark.parametrize("cut", range(len(CALL) + 1))
def test_a_call_cut_anywhere_carries_a_prefix_of_its_arguments(cut):
    text = CALL[:cut]
    whole = events_of([text])
    assert whole == events_of(list(text)), "the result depends on how the text was cut into pieces"
    content, calls = whole
    if cut < len(" " + tools.OPEN):  # not yet a call: the text is the answer
        assert calls == [] and content == text
        return
    assert content == ""
    head = CALL.index('"arguments":') + len('"arguments":')
    if cut < head:  # the call is not announced until its name is whole
        assert calls == [] or calls == [("get_weather", "")]
        return
    ((name, arguments),) = calls
    assert name == "get_weather"
    assert arguments == ARGUMENTS[: min(cut - head, len(ARGUMENTS))]


# --- the grammar: tools and a response format together -----------------------------------------------------------

ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
GET_WEATHER = {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
A_CALL = f' {tools.call_prefix("get_weather")}{{"city": "Paris"}}}}{tools.CLOSE}'


@pytest.mark.parametrize(
    ("choice", "accepted", "refused"),
    [
        # auto: a call, or a text answer in the format; never free text or JSON outside it
        ("auto", ['{"ok": true}', A_CALL], ["hello", '{"nope": 1}', 'Sure: {"ok": true}']),
        # a forced call is a call: the format governs text, and there is none
        ("get_weather", [A_CALL], ['{"ok": true}', "hello"]),
        ("required", [A_CALL, f"{A_CALL}\n{A_CALL[1:]}"], ['{"ok": true}']),
    ],
)
def test_tools_with_a_response_format(choice, accepted, refused):
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_structural_tag(tools.structural_tag([GET_WEATHER], choice, True, ANSWER))
    for text in accepted:
        assert _is_grammar_accept_string(grammar, text), text
    for text in refused:
        assert not _is_grammar_accept_string(grammar, text), text


def test_chat_and_responses_take_tools_with_a_format(client, tiny_lite_dir):
    """The request instructor's RESPONSES_TOOLS mode sends (function tools, a named tool_choice, a json_schema
    text format), and chat's equivalent, reach the engine with the grammar above."""
    engine = FakeEngine(words=PIECES)
    fmt = {"type": "json_schema", "name": "answer", "schema": ANSWER}
    with make_client(tiny_lite_dir, engine=engine) as c:
        tool = {"type": "function", **GET_WEATHER}
        body = {"model": MODEL, "input": "weather?", "tools": [tool], "text": {"format": fmt}}
        r = c.post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "get_weather"}})
        assert r.status_code == 200, r.text
        assert [item["type"] for item in r.json()["output"]] == ["function_call"]
        assert engine.options[-1].structural_tag == tools.structural_tag([GET_WEATHER], "get_weather", True)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
        chat["response_format"] = {"type": "json_schema", "json_schema": fmt}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        tool_spec = {**GET_WEATHER, "description": None}
        assert engine.options[-1].structural_tag == tools.structural_tag([tool_spec], "auto", True, ANSWER)
        del chat["response_format"]  # auto alone: calls when the model starts one, text otherwise
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert engine.options[-1].structural_tag == tools.structural_tag([tool_spec], "auto", True)
        assert json.loads(engine.options[-1].structural_tag)["format"]["type"] == "triggered_tags"


# --- a call cut by max_tokens, on every API (FakeEngine: one piece of the call per step) ---------------------------

PIECES = [
    " <tool_call>",
    '{"name":"get_weather","arguments":',
    '{"city":',
    ' "Par',
    'is"',
    "}",
    "}</tool",
    "_call>",
]
FULL_ARGUMENTS = '{"city": "Paris"}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def expected(max_tokens: int) -> str:
    """The argument text in the first `max_tokens` pieces."""
    text = "".join(PIECES[:max_tokens])
    start = text.find('"arguments":')
    return (
        "" if start < 0 else FULL_ARGUMENTS[: len(text) - start - len('"arguments":')][: len(FULL_ARGUMENTS)]
    )


@pytest.fixture(scope="module")
def client(tiny_lite_dir):
    with make_client(tiny_lite_dir, engine=FakeEngine(words=PIECES)) as c:
        yield c


@pytest.mark.parametrize("max_tokens", range(2, len(PIECES) + 1))
def test_chat_call_cut_by_max_tokens(client, max_tokens):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS}
    body |= {"tool_choice": FORCED, "max_tokens": max_tokens}
    want = expected(max_tokens)
    finish = "tool_calls" if max_tokens == len(PIECES) else "length"
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["arguments"] == want and choice["finish_reason"] == finish
    chunks = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    deltas = [d for ch in chunks for d in ch["choices"][0]["delta"].get("tool_calls") or []]
    assert "".join(d["function"]["arguments"] for d in deltas) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("max_tokens", range(2, len(PIECES) + 1))
def test_responses_call_cut_by_max_output_tokens(client, max_tokens):
    tool = {"type": "function", **TOOLS[0]["function"]}
    body = {"model": MODEL, "input": "weather?", "tools": [tool], "max_output_tokens": max_tokens}
    body["tool_choice"] = {"type": "function", "name": "get_weather"}
    want = expected(max_tokens)
    (item,) = client.post("/v1/responses", json=body).json()["output"]
    assert item["type"] == "function_call" and item["arguments"] == want
    events = named_events(client.post("/v1/responses", json={**body, "stream": True}).text)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert "".join(deltas) == done["arguments"] == want


@pytest.mark.parametrize("max_tokens", range(2, len(PIECES) + 1))
def test_anthropic_call_cut_by_max_tokens(client, max_tokens):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "max_tokens": max_tokens}
    body |= {"tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]}
    body["tool_choice"] = {"type": "tool", "name": "get_weather"}
    want = expected(max_tokens)
    message = client.post("/v1/messages", json=body).json()
    (block,) = message["content"]
    # Anthropic's input is an object: the arguments so far, with their open string and object closed
    assert block["type"] == "tool_use" and block["input"] == ANTHROPIC_INPUT[want]
    events = named_events(client.post("/v1/messages", json={**body, "stream": True}).text)
    parts = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(parts) == want


ANTHROPIC_INPUT = {
    "": {},
    '{"city":': {},
    '{"city": "Par': {"city": "Par"},
    '{"city": "Paris"': {"city": "Paris"},
    FULL_ARGUMENTS: {"city": "Paris"},
}


def named_events(text: str) -> list[dict]:
    """An SSE stream with `event:` names (Responses, Messages): each data's type equal to its name."""
    kinds = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == kinds
    return events
