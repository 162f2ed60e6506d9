"""The Anthropic Messages API (`/v1/messages`) end to end: `python -m server serve` on the tiny checkpoint (the
real vLLM engine) driven by the official `anthropic` SDK and raw HTTP.

Forced decisions (the tiny model's weights are random) are made with `tool_choice: {"type": "tool"}` and say so.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.test_gateway_engine import MODEL, Server, module_server, named_events
from tests.test_gateway_tools import WEATHER_PARAMS

pytestmark = pytest.mark.engine

WEATHER = {"name": "get_weather", "description": "Weather now.", "input_schema": WEATHER_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The anthropic SDK 2.x no longer takes `temperature` as an argument; the API (and this server) still do.
GREEDY = {"temperature": 0}


server = module_server("anthropic", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def client(server: Server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def events(server: Server, body: dict) -> list[tuple[str, dict]]:
    return [(d["type"], d) for d in named_events(server, "/v1/messages", body)]


def test_create_plain(client):
    m = client.messages.create(
        model=MODEL, max_tokens=12, messages=ASK, system="Be brief.", extra_body=GREEDY
    )
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and isinstance(m.content[0].text, str)
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= m.usage.output_tokens <= 12 and m.usage.input_tokens > 0


def test_stop_sequence(client):
    full = client.messages.create(model=MODEL, max_tokens=20, messages=ASK, extra_body=GREEDY)
    text = full.content[0].text
    if len(text) < 6:
        pytest.skip(f"greedy output too short to cut: {text!r}")
    stop = text[3:6]
    cut = client.messages.create(
        model=MODEL, max_tokens=20, messages=ASK, extra_body=GREEDY, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_stream_events_in_order_and_equal_to_create(client, server):
    whole = client.messages.create(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY)
    seen = events(server, {"max_tokens": 16, "messages": ASK, "temperature": 0})
    kinds = [k for k, _ in seen]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[2] == "content_block_start" and kinds[-3] == "content_block_stop"
    text = "".join(d["delta"]["text"] for k, d in seen if k == "content_block_delta")
    assert text == whole.content[0].text
    assert seen[0][1]["message"]["usage"]["input_tokens"] == whole.usage.input_tokens
    assert seen[-2][1]["usage"]["output_tokens"] == whole.usage.output_tokens
    with client.messages.stream(model=MODEL, max_tokens=16, messages=ASK, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason


def test_forced_tool_create_and_stream(client, server):
    """Forced: tool_choice {"type": "tool"}. The input validates against input_schema, streamed or not."""
    kwargs = dict(
        model=MODEL,
        max_tokens=300,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    m = client.messages.create(**kwargs)
    assert m.stop_reason == "tool_use"
    (block,) = [b for b in m.content if b.type == "tool_use"]
    assert block.name == "get_weather" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, WEATHER_PARAMS)
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == block.input and final.stop_reason == "tool_use"
    body = {k: v for k, v in kwargs.items() if k not in ("model", "extra_body")} | GREEDY
    seen = events(server, body)
    start = next(
        d for k, d in seen if k == "content_block_start" and d["content_block"]["type"] == "tool_use"
    )
    assert start["content_block"]["input"] == {}
    partial = "".join(
        d["delta"]["partial_json"]
        for k, d in seen
        if k == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    )
    assert json.loads(partial) == block.input


def test_tool_result_turn_and_count_tokens(client):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris", "unit": "celsius", "detailed": False},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}'},
                {"type": "text", "text": "So?"},
            ],
        },
    ]
    m = client.messages.create(
        model=MODEL, max_tokens=4, messages=messages, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert all(b.type == "text" for b in m.content)
    counted = client.messages.count_tokens(model=MODEL, messages=messages, tools=[WEATHER])
    assert counted.input_tokens == m.usage.input_tokens


@pytest.mark.parametrize(
    "body,status,kind",
    [
        ({"messages": ASK}, 400, "invalid_request_error"),  # max_tokens is required
        ({"max_tokens": 5, "messages": ASK, "model": "claude-sonnet-4"}, 404, "not_found_error"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
        ),
        (
            {
                "max_tokens": 5,
                "messages": ASK,
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            400,
            "invalid_request_error",
        ),
        (
            {"max_tokens": 5, "messages": ASK, "tools": [{**WEATHER, "name": "bad name"}]},
            400,
            "invalid_request_error",
        ),
        ({"max_tokens": 5, "messages": ASK, "temperature": 1.5}, 400, "invalid_request_error"),
        ({"max_tokens": 100_000, "messages": ASK}, 400, "invalid_request_error"),
    ],
)
def test_errors_in_anthropic_shape(server, body, status, kind):
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"type", "error"} and err["type"] == "error"
    assert err["error"]["type"] == kind and err["error"]["message"]
    assert (
        httpx.post(
            f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": ASK}
        ).status_code
        == 200
    )


def test_sdk_raises_typed_errors(client):
    import anthropic

    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4", max_tokens=5, messages=ASK)
