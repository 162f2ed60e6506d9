"""Tool calling end to end: `python -m server serve` on the tiny checkpoint (the real vLLM engine, xgrammar
structural tags) driven by the official openai SDK and LangChain.

The tiny model's weights are random, so it never *decides* anything: every test that needs a call forces it
with a named `tool_choice` or `required` (and says so). What is proven is the guarantee: the name is one of the
request's tools and the arguments parse and validate against that tool's schema, streamed or not. Parameter
schemas are enum- or boolean-bounded with `additionalProperties: false`, so a random model must finish them.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from tests import openai_schema
from tests.test_gateway_engine import (
    MODEL,
    Server,
    module_server,
    spec_check,
    strict_chunk,
    strict_completion,
)

pytestmark = pytest.mark.engine

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "detailed": {"type": "boolean"},
    },
    "required": ["city", "unit", "detailed"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now.", "parameters": WEATHER_PARAMS},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time now.", "parameters": TIME_PARAMS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# The tiny tokenizer spends many tokens on JSON: the tool list alone takes ~400.
server = module_server("tools", "--max-model-len", "2048")


@pytest.fixture(scope="module")
def oai(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def create(oai, **kwargs):
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, **kwargs)
    body = raw.http_response.json()
    spec_check(openai_schema.chat_completion, body)
    return strict_completion(body)


def assert_valid_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# --- the OpenAI SDK -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_named_choice_always_valid(oai, seed):
    """Forced: a named tool_choice. Sampled at temperature 1 with several seeds: every output is a valid call."""
    c = create(
        oai,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=1.0,
        seed=seed,
        max_tokens=200,
    )
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert_valid_calls(choice.message.tool_calls, names=("get_time",))
    assert c.usage.completion_tokens >= 1


def test_required_choice_streamed_equals_whole(oai):
    """Forced: tool_choice required, greedy. The streamed deltas reassemble into the same call."""
    kwargs = dict(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    whole = create(oai, **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert_valid_calls(whole.message.tool_calls)
    assert len(whole.message.tool_calls) == 1

    calls: dict[int, dict] = {}
    finish = None
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    for chunk in chunks:
        spec_check(openai_schema.chat_chunk, chunk.to_dict())
        strict_chunk(chunk.to_dict())
        for ch in chunk.choices:
            assert not ch.delta.content
            for delta in ch.delta.tool_calls or []:
                if delta.id is not None:  # the first delta of a call: index, id, type, name
                    assert delta.type == "function" and delta.function.name and delta.index not in calls
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    assert call["name"] == whole.message.tool_calls[0].function.name
    assert call["arguments"] == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].usage.completion_tokens == create(oai, **kwargs).usage.completion_tokens


def test_auto_may_answer_in_text(oai):
    """Under auto the model may answer in text; the tools are still offered: rendered into the prompt (which is
    longer than the same question's without them), and a call it starts is guaranteed valid."""
    c = create(oai, messages=ASK, tools=TOOLS, temperature=0, max_tokens=24)
    message = c.choices[0].message
    if message.tool_calls:  # the random model started a call: then it must be a valid one
        assert_valid_calls(message.tool_calls)
    else:
        assert isinstance(message.content, str) and c.choices[0].finish_reason in ("stop", "length")
        assert "<tool_call>" not in message.content  # a call is never left in the text
    bare = create(oai, messages=ASK, temperature=0, max_tokens=1)
    assert c.usage.prompt_tokens > bare.usage.prompt_tokens + 50, (c.usage, bare.usage)


def test_tool_results_rendered_into_the_prompt(oai, tiny_lite_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lite_dir))
    args = {"city": "Paris", "unit": "celsius", "detailed": False}
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    c = create(oai, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1)
    # The format, written out by hand (docs/api.md shows it rendered):
    tools_block = '## Tools\n\nYou can call these functions. To call one, write <tool_call>{"name":NAME,"arguments":ARGUMENTS}</tool_call> with the arguments as JSON; its result comes back in a Tool turn.\n\n'
    tools_block += "".join(json.dumps(t["function"], ensure_ascii=False) + "\n" for t in TOOLS) + "\n"
    text = (
        tok.bos_token
        + tools_block
        + "User: What is the weather in Paris?\n\n"
        + 'Assistant: <tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius","detailed":false}}</tool_call>'
        + tok.eos_token
        + 'Tool: <tool_result id="call_1" name="get_weather">{"temp": 21}</tool_result>\n\n'
        + "Assistant:"
    )
    assert c.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": 3}},
                }
            ]
        },
        "tools[0].function.parameters",
    ),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}], "tools": TOOLS},
        "messages[1].tool_call_id",
    ),
    ({"functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_tool_input(server, extra, param):
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    spec_check(openai_schema.error, r.json())


class Verdict(BaseModel):
    ok: bool
    grade: Literal["A", "B", "C"]


def test_sdk_parse_pydantic(oai):
    class Choice(BaseModel):
        ok: bool
        pick: bool

    for seed in range(3):
        parsed = oai.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Choice, temperature=1.0, seed=seed, max_tokens=100
        )
        message = parsed.choices[0].message
        assert isinstance(message.parsed, Choice) and parsed.choices[0].finish_reason == "stop"
        assert not re.search(r"\s\s", message.content), message.content  # no padding: one blank at most


# --- LangChain --------------------------------------------------------------------------------------------------


def chat_model(server: Server, **kwargs):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL, base_url=f"{server.url}/v1", api_key="unused", max_retries=0, max_tokens=200, **kwargs
    )


def lc_tools():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome", "Tokyo"], detailed: bool) -> str:
        """Weather now in a city."""
        return json.dumps({"city": city, "temp": 21, "detailed": detailed})

    return get_weather


def test_langchain_bind_tools_invoke_and_stream(server):
    get_weather = lc_tools()
    schema = get_weather.tool_call_schema.model_json_schema()
    llm = chat_model(server, temperature=0).bind_tools([get_weather], tool_choice="get_weather", strict=True)
    msg = llm.invoke("Weather in Rome?")  # forced: a named tool_choice
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], schema)
    aggregate = None
    for chunk in llm.stream("Weather in Rome?"):
        aggregate = chunk if aggregate is None else aggregate + chunk
    assert aggregate.tool_calls == [{**call, "id": aggregate.tool_calls[0]["id"]}]


def test_langchain_two_step_agent_loop(server):
    """call (forced by a named tool_choice) -> the tool runs -> its result goes back -> a final text answer."""
    from langchain_core.messages import HumanMessage, ToolMessage

    get_weather = lc_tools()
    model = chat_model(server, temperature=0)
    history = [HumanMessage("What's the weather in Tokyo?")]
    first = model.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke(history)
    (call,) = first.tool_calls
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    history += [first, result]
    final = model.bind_tools([get_weather], tool_choice="none").invoke(history)
    assert not final.tool_calls and isinstance(final.content, str)
    assert (
        final.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]
    )  # the result is in the prompt


def test_langchain_structured_output_three_ways(server, tiny_lite_dir):
    from transformers import AutoTokenizer

    model = chat_model(server, temperature=0)
    by_tool = model.with_structured_output(Verdict, method="function_calling", strict=True).invoke("Judge.")
    assert isinstance(by_tool, Verdict)
    by_schema = model.with_structured_output(Verdict, method="json_schema", strict=True).invoke("Judge.")
    assert isinstance(by_schema, Verdict)
    # json_mode constrains to *some* JSON object; a random model would write keys forever, so a logit bias forces
    # it to close the object at once ("{}"): what is tested is the wiring, LangChain parsing the JSON it gets.
    tok = AutoTokenizer.from_pretrained(str(tiny_lite_dir))
    bias = {str(t): 100 for t in tok.encode("{}", add_special_tokens=False)}
    biased = chat_model(server, temperature=0, logit_bias=bias)
    by_mode = biased.with_structured_output(None, method="json_mode").invoke("Answer in JSON.")
    assert by_mode == {}
