"""Bounded input (HTTP unit tests with the FakeEngine): every over-limit input is a 400 that names the parameter
and the limit, on every API that takes it; nothing a client sends gives a 5xx. The same inputs against the real
engine, with probes polling, are in test_hostile_clients.py.
"""

from __future__ import annotations

import time

import pytest

from tests.test_gateway_http import MODEL, assert_openai_error, make_client

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tiny_lite_dir):
    with make_client(
        tiny_lite_dir,
        max_model_len=32768,
        max_stop_sequences=4,
        max_stop_length=8,
        max_tools=3,
        max_tool_description_length=50,
        max_schema_nodes=40,
        max_schema_depth=6,
        max_schema_properties=10,
        max_schema_enum_values=5,
        max_schema_branches=4,
        max_schema_optional_properties=6,
        max_schema_pattern_repeat=100,
    ) as c:
        yield c


def chat(client, **body):
    return client.post(CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 3, **body})


def tool(name: str = "f", parameters: dict | None = None, description: str | None = None) -> dict:
    fn: dict = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description is not None:
        fn["description"] = description
    return {"type": "function", "function": fn}


def obj(properties: dict) -> dict:
    return {"type": "object", "properties": properties}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = obj({"a": schema})
    return schema


def error_of(r, status: int, param: str, *words: str) -> dict:
    err = assert_openai_error(r, status, param)
    for word in words:
        assert word in err["message"], err["message"]
    return err


# --- stop strings -------------------------------------------------------------------------------------------------


def test_stop_strings_within_the_limits_pass(client):
    assert chat(client, stop=["a", "b", "c", "12345678"]).status_code == 200


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_too_many_stop_strings(client, path):
    body = {"model": MODEL, "max_tokens": 3, "stop": list("abcde")}
    body.update({"messages": USER} if path == CHAT else {"prompt": "hi"})
    error_of(client.post(path, json=body), 400, "stop", "5 strings", "at most 4", "--max-stop-sequences")


def test_stop_string_too_long(client):
    error_of(chat(client, stop="123456789"), 400, "stop", "9 characters", "at most 8", "--max-stop-length")


def test_anthropic_stop_sequences_named_as_anthropic_names_them(client):
    r = client.post(
        "/v1/messages",
        json={"model": MODEL, "max_tokens": 3, "messages": USER, "stop_sequences": list("abcde")},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "stop_sequences" in err["message"], err
    assert "--max-stop-sequences" in err["message"]


# --- tools --------------------------------------------------------------------------------------------------------


def test_too_many_tools(client):
    tools = [tool(f"f{i}") for i in range(4)]
    error_of(chat(client, tools=tools), 400, "tools", "4 tools", "at most 3", "--max-tools")


def test_tool_description_too_long(client):
    r = chat(client, tools=[tool(description="x" * 51)])
    error_of(r, 400, "tools[0].function.description", "51 characters", "--max-tool-description-length")


# --- schemas ------------------------------------------------------------------------------------------------------


def test_schemas_within_the_limits_pass(client):
    schema = obj({f"p{i}": {"type": "string"} for i in range(5)})
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": obj({"x": {"enum": [1, 2, 3]}})}}
    assert chat(client, tools=[tool(parameters=schema)], response_format=fmt).status_code == 200


@pytest.mark.parametrize(
    ("schema", "flag"),
    [
        (nested(7), "--max-schema-depth"),
        (nested(120), "--max-schema-depth"),  # deeper than jsonschema's recursion would survive unbounded
        (
            {
                "type": "object",
                "properties": {f"p{i}": {} for i in range(11)},
                "required": [f"p{i}" for i in range(11)],
            },
            "--max-schema-properties",
        ),
        (obj({"e": {"enum": list(range(6))}}), "--max-schema-enum-values"),
        (obj({"s": {"type": "string", "pattern": "^a{101}$"}}), "--max-schema-pattern-repeat"),
        (obj({"s": {"type": "string", "pattern": "(a{1,11}){1,10}"}}), "--max-schema-pattern-repeat"),
        (obj({"s": {"type": "string", "pattern": "a{60}b{41}"}}), "--max-schema-pattern-repeat"),
        ({"type": "object", "patternProperties": {"^x{200}$": {}}}, "--max-schema-pattern-repeat"),
        (obj({"u": {"anyOf": [{"type": "string"}] * 5}}), "--max-schema-branches"),
        (obj({"u": {"allOf": [{"oneOf": [{}, {}]}, {"anyOf": [{}, {}]}]}}), "--max-schema-branches"),
        (
            obj({"a": {"items": [{"items": {}}] * 3}, "b": {"$defs": {f"d{i}": {} for i in range(40)}}}),
            "--max-schema-nodes",
        ),
    ],
)
def test_tool_schema_over_a_limit(client, schema, flag):
    r = chat(client, tools=[tool(parameters=schema)])
    err = error_of(r, 400, "tools[0].function.parameters", flag)
    assert err["code"] == "schema_too_large"


def test_optional_properties_count_what_is_not_required(client):
    # 6 optional properties are allowed: 5 optional + 3 required pass, 7 optional do not.
    nested = {"type": "object", "properties": {n: {"type": "string"} for n in "xyz"}, "required": list("xyz")}
    schema = obj({**{f"p{i}": {"type": "string"} for i in range(5)}, "o": nested})
    schema["required"] = ["o"]
    assert chat(client, tools=[tool(parameters=schema)]).status_code == 200
    loose = obj({f"p{i}": {"type": "string"} for i in range(7)})
    r = chat(client, tools=[tool(parameters=loose)])
    error_of(r, 400, "tools[0].function.parameters", "--max-schema-optional-properties")


def test_patterns_within_the_repeat_limit_pass(client):
    for pattern in ("^[a-z]+$", "^a{100}$", "(a{1,10}){1,10}", "[0-9]{3}-[0-9]{4}"):
        schema = obj({"s": {"type": "string", "pattern": pattern}})
        assert chat(client, tools=[tool(parameters=schema)]).status_code == 200, pattern


def test_the_budget_counts_every_schema_of_the_request(client):
    # 6 properties each: two tools are within the limit of 10 alone, not together.
    six = obj({f"p{i}": {"type": "string"} for i in range(6)})
    assert chat(client, tools=[tool("a", six)]).status_code == 200
    error_of(chat(client, tools=[tool("a", six), tool("b", six)]), 400, "tools[1].function.parameters")
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": six}}
    error_of(
        chat(client, tools=[tool("a", six)], response_format=fmt), 400, "response_format.json_schema.schema"
    )


def test_response_format_schema_over_a_limit_on_responses(client):
    fmt = {"type": "json_schema", "name": "a", "schema": nested(30)}
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi", "text": {"format": fmt}})
    error_of(r, 400, "text.format", "--max-schema-depth")


def test_anthropic_schema_named_input_schema(client):
    tools = [{"name": "f", "input_schema": nested(30)}]
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 3, "messages": USER, "tools": tools})
    assert r.status_code == 400, r.text
    assert "tools[0].input_schema" in r.json()["error"]["message"]
    r = client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": USER, "tools": tools})
    assert r.status_code == 400 and "--max-schema-depth" in r.json()["error"]["message"], r.text


def test_invalid_schema_still_a_400(client):
    r = chat(client, tools=[tool(parameters={"type": "object", "properties": {"a": {"type": 5}}})])
    error_of(r, 400, "tools[0].function.parameters", "not a valid JSON schema")


# --- numbers and strings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [10**30, 2**63, 10**6])
def test_top_k_beyond_the_vocabulary(client, top_k):
    error_of(chat(client, top_k=top_k), 400, "top_k", "vocabulary")
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 3, "messages": USER, "top_k": top_k})
    assert r.status_code == 400 and "top_k" in r.json()["error"]["message"], r.text


def test_top_k_within_the_vocabulary_passes(client):
    for top_k in (-1, 0, 1, 40):
        assert chat(client, top_k=top_k).status_code == 200, top_k


def raw_post(client, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
            "messages[0].content",
        ),
        (
            CHAT,
            '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["x", "\\ud800"]}',
            "stop[1]",
        ),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\ud83d"]}', "prompt[1]"),
        (
            "/v1/messages",
            '{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "\\udc00"}]}',
            "messages[0].content",
        ),
        ("/v1/responses", '{"model": "tiny", "input": "\\ud800"}', "input"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(client, path, body, param):
    r = raw_post(client, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(f"{param} contains a lone UTF-16 surrogate"), err
    if path != "/v1/messages":  # Anthropic's error shape has no param
        assert err["param"] == param, err


def test_a_surrogate_pair_is_text(client):
    r = raw_post(
        client,
        CHAT,
        '{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}',
    )
    assert r.status_code == 200, r.text


def test_a_body_nested_too_deeply_is_a_400(client):
    r = raw_post(client, CHAT, '{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"]["message"]


def test_invalid_json_is_still_fastapis_400(client):
    r = raw_post(client, CHAT, '{"model": "tiny", "messages": [')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_large_body_is_prepared_off_the_loop_with_the_same_answer(client):
    # Above the inline size the plan, template and tokenising run in a worker thread: same 200, same errors.
    big = "word " * 8000
    r = chat(client, messages=[{"role": "user", "content": big}], max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 1000
    error_of(chat(client, messages=[{"role": "user", "content": big}], stop=list("abcde")), 400, "stop")


def test_loop_lag_is_exported(client):
    time.sleep(0.5)  # the sampler records one value every 0.1 s
    text = client.get("/metrics").text
    assert "# TYPE dsv2_event_loop_lag_seconds histogram" in text
    count = [line for line in text.splitlines() if line.startswith("dsv2_event_loop_lag_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 2, count


def test_limits_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    section = doc.split("## Limits and abuse", 1)[1].split("\n## ", 1)[0]
    for flag in (
        "--max-stop-sequences",
        "--max-stop-length",
        "--max-tools",
        "--max-tool-description-length",
        "--max-schema-nodes",
        "--max-schema-depth",
        "--max-schema-properties",
        "--max-schema-enum-values",
        "--max-schema-branches",
        "--max-schema-optional-properties",
        "--max-schema-pattern-repeat",
        "--max-request-bytes",
        "--stream-send-timeout",
        "--header-timeout",
        "--body-timeout",
        "--max-connections",
        "dsv2_event_loop_lag_seconds",
        "DSV2EventLoopLag",
    ):
        assert flag in section, flag


def test_continue_final_message(client):
    partial = [*USER, {"role": "assistant", "content": "Once upon a"}]
    r = chat(client, messages=partial, continue_final_message=True, add_generation_prompt=False)
    assert r.status_code == 200, r.text
    opened = chat(client, messages=partial)
    assert r.json()["usage"]["prompt_tokens"] < opened.json()["usage"]["prompt_tokens"]  # no EOS, no new turn
    r = chat(client, messages=partial, continue_final_message=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message", r.text
    r = chat(client, continue_final_message=True, add_generation_prompt=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role", r.text
