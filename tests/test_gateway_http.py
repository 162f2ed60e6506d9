"""HTTP unit tests of the gateway over FakeEngine (tests/fake_engine.py): auth, limits, admission by cost,
readiness and liveness, error shapes against OpenAI's published schemas, SSE framing, request ids, drain.
No vLLM engine here; behaviour with the real engine is in test_gateway_engine.py.
"""

from __future__ import annotations

import json
import threading

import pytest
from starlette.testclient import TestClient

from server.gateway.app import create_app
from server.settings import Settings
from tests import openai_schema
from tests.fake_engine import FakeEngine

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def make_client(
    model_dir, engine: FakeEngine | None = None, max_model_len: int = 256, **settings
) -> TestClient:
    s = Settings(model=str(model_dir), **{"served_model_name": MODEL, **settings})
    engine = engine or FakeEngine(max_model_len=max_model_len)
    return TestClient(create_app(s, engine=engine), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        yield c


def assert_openai_error(r, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert r.headers["x-request-id"]
    assert set(body) == {"error"}
    if openai_schema.available():
        openai_schema.error(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "__any__":
        assert body["error"]["param"] == param
    return body["error"]


def sse_events(text: str) -> list:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_non_stream(client):
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from the fake engine.",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6


def test_chat_stream_framing(client):
    r = client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "n": 2, "stream_options": {"include_usage": True}},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(r.text)
    assert [c["choices"][0]["delta"].get("role") for c in chunks[:2]] == ["assistant", "assistant"]
    assert {c["choices"][0]["index"] for c in chunks[:2]} == {0, 1}
    content = [c for c in chunks[2:] if c["choices"]]
    for i in (0, 1):
        mine = [c["choices"][0] for c in content if c["choices"][0]["index"] == i]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == "Hello from the fake engine."
        assert [ch["finish_reason"] for ch in mine][-1] == "stop"
        assert all(ch["finish_reason"] is None for ch in mine[:-1])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_completions(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3, "echo": True})
    body = r.json()
    assert body["choices"][0]["text"] == "OnceHello from the"
    assert body["choices"][0]["finish_reason"] == "length"
    r = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2, "stream": True}
    )
    chunks = sse_events(r.text)
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": MODEL}, 400, "messages"),
        ({**CHAT, "model": "nope"}, 404, "model"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (
            {**CHAT, "messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]},
            400,
            "messages[0].tool_call_id",
        ),
        ({**CHAT, "messages": [{"role": "function", "content": "x", "name": "f"}]}, 400, "messages[0].role"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({**CHAT, "temperature": 5}, 400, "temperature"),
        ({**CHAT, "top_p": 0}, 400, "top_p"),
        ({**CHAT, "n": 0}, 400, "n"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 10_000}, 400, "messages"),
        ({**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
        (
            {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            400,
            "tool_choice",
        ),
        (
            {
                **CHAT,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            },
            400,
            "tools[0].function.parameters",
        ),
        (
            {
                **CHAT,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            },
            400,
            "tools[0].function.parameters",
        ),
        ({**CHAT, "tools": [TOOL, TOOL]}, 400, "tools[1].function.name"),
        (
            {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
            400,
            "tools[0].function.name",
        ),
        ({**CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
        (
            {
                **CHAT,
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    }
                ],
            },
            400,
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({**CHAT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({**CHAT, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
        ({**CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
        ({**CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
        ({**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0].type",
        ),
        ({**CHAT, "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
        ({**CHAT, "temperature": False}, 400, "temperature"),
        ({**CHAT, "top_p": "0.5"}, 400, "top_p"),
        ({**CHAT, "n": True}, 400, "n"),
        ({**CHAT, "n": 2.5}, 400, "n"),
        ({**CHAT, "stream": "yes"}, 400, "stream"),
        ({**CHAT, "logprobs": 1}, 400, "logprobs"),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            400,
            "messages[0].content[0].text",
        ),
        ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({**CHAT, "stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ],
)
def test_bad_chat_requests(client, body, status, param):
    err = assert_openai_error(client.post("/v1/chat/completions", json=body), status, param)
    if param == "messages" and status == 400 and "max_tokens" in body:
        assert err["code"] == "context_length_exceeded"
        assert "256" in err["message"] and "10000" in err["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_malformed_json_unknown_route_and_method(client):
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400)
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"})
    assert_openai_error(r, 400, "suffix")


def test_models_list_and_retrieve(client):
    models = client.get("/v1/models").json()
    openai_schema.require_spec()
    openai_schema.model_list(models)
    one = client.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200 and one.json() == models["data"][0]
    openai_schema.model(one.json())
    err = assert_openai_error(client.get("/v1/models/gpt-4o"), 404, "model")
    assert err["code"] == "model_not_found"
    assert_openai_error(client.get("/v1/models/org/name"), 404, "model")


def test_models_health_version_metrics(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 256
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert "version" in client.get("/version").json()
    text = client.get("/metrics").text
    assert 'dsv2_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "dsv2_time_to_first_token_seconds_bucket" in text


def test_request_id_sanitised_and_becomes_the_engine_id(tiny_lite_dir):
    engine = FakeEngine()
    with make_client(tiny_lite_dir, engine=engine) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert r.json()["id"] == "chatcmpl-abc-123" and engine.generated[-1] == "chatcmpl-abc-123"
        nasty = 'id with spaces\t<script>"quotes"' + "x" * 200
        r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": nasty})
        rid = r.headers["x-request-id"]
        assert rid == ("idwithspacesscriptquotes" + "x" * 200)[:64]
        assert engine.generated[-1] == f"chatcmpl-{rid}"
        r = c.get("/health", headers={"X-Request-Id": "<>"})  # nothing usable left: a fresh id
        assert len(r.headers["x-request-id"]) == 32
        # every API's body id is its engine id, built from the request id
        for path, body, prefix in [
            ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}, "cmpl-"),
            ("/v1/responses", {"model": MODEL, "input": "x", "max_output_tokens": 2}, "resp_"),
            ("/v1/messages", {"model": MODEL, "messages": CHAT["messages"], "max_tokens": 2}, "msg_"),
        ]:
            for stream in (False, True):
                r = c.post(path, json={**body, "stream": stream}, headers={"X-Request-Id": "abc-123"})
                assert engine.generated[-1] == f"{prefix}abc-123", (path, engine.generated[-1])
                assert f'"{prefix}abc-123"' in r.text and r.headers["x-request-id"] == "abc-123"
                if not stream:
                    assert r.json()["id"] == f"{prefix}abc-123"


def test_same_client_request_id_twice_in_flight(tiny_lite_dir):
    engine = FakeEngine(delay=0.1)
    with make_client(tiny_lite_dir, engine=engine) as c:
        statuses = []

        def go():
            statuses.append(
                c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "dup"}).status_code
            )

        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200, 200]
        assert len(set(engine.generated)) == 2 and "chatcmpl-dup" in engine.generated


def test_engine_ids_never_collide_across_requests(tiny_lite_dir):
    """A multi-prompt completion's engine ids are `<id>-<i>`: a client id that makes one of them equal another
    in-flight request's id gets a suffix, so aborting one request (here at its deadline) never aborts the
    other (vLLM aborts every request sharing an external id; FakeEngine does the same)."""
    words = [f" w{i}" for i in range(40)]
    engine = FakeEngine(delay=0.05, words=words)  # the victim streams for 2 s: the other request runs inside
    with make_client(tiny_lite_dir, engine=engine) as c:
        results = {}

        def victim():
            body = {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 40}
            results["victim"] = c.post("/v1/completions", json=body, headers={"X-Request-Id": "req-1"})

        thread = threading.Thread(target=victim)
        thread.start()
        while "cmpl-req-1" not in engine.running:
            threading.Event().wait(0.01)
        body = {"model": MODEL, "prompt": ["a", "b"]}
        r = c.post("/v1/completions", json=body, headers={"X-Request-Id": "req", "X-Request-Timeout": "0.08"})
        assert_openai_error(r, 504)
        assert "cmpl-req-1" in engine.running, "the victim ended before the other request: nothing was tested"
        thread.join()
        chunks = sse_events(results["victim"].text)
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "".join(words)
        assert "cmpl-req-1" not in engine.aborted
        assert len(engine.generated) == len(set(engine.generated)) == 3, engine.generated
        assert all(rid.startswith("cmpl-req-") for rid in engine.generated)


def test_unhandled_error_is_a_500_with_request_id_and_no_internals(tiny_lite_dir, monkeypatch):
    from server.gateway import serving

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(serving, "chat", broken)
    with make_client(tiny_lite_dir) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-500"})
        err = assert_openai_error(r, 500)
        assert r.headers["x-request-id"] == "req-500"
        assert "secret" not in r.text and err["type"] == "server_error"
        assert (
            'dsv2_http_requests_total{method="POST",route="/v1/chat/completions",status="500"} 1.0'
            in c.get("/metrics").text
        )


def test_auth(tiny_lite_dir):
    with make_client(tiny_lite_dir, api_keys=["k1", "k2"]) as c:
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 401)
        for wrong in ("nope", "k", "k1k1", "K1", "Basic k1"):
            header = wrong if wrong.startswith("Basic") else f"Bearer {wrong}"
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401, wrong
        assert_openai_error(
            c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}), 401
        )
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def test_body_limit(tiny_lite_dir):
    with make_client(tiny_lite_dir, max_request_bytes=2048) as c:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
        assert_openai_error(c.post("/v1/chat/completions", json=big), 413)

        def chunks():
            yield json.dumps(big).encode()

        assert_openai_error(c.post("/v1/chat/completions", content=chunks()), 413)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def _wait_running(engine: FakeEngine, count: int = 1) -> None:
    for _ in range(250):
        if len(engine.running) >= count:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"{count} request(s) never reached the engine")


def test_budget_counts_sequences_429_with_retry_after(tiny_lite_dir):
    engine = FakeEngine(delay=0.2)
    with make_client(tiny_lite_dir, engine=engine, max_inflight_sequences=4) as c:
        results = {}

        def slow():
            results["slow"] = c.post("/v1/chat/completions", json={**CHAT, "n": 3}).status_code

        t = threading.Thread(target=slow)
        t.start()
        _wait_running(engine)
        assert "dsv2_sequences_in_flight 3.0" in c.get("/metrics").text
        r = c.post("/v1/chat/completions", json={**CHAT, "n": 2})  # 3 + 2 > 4
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert "3 of 4" in err["message"]
        # a 2-prompt completion costs 2 sequences as well
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2})
        assert_openai_error(r, 429)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # 3 + 1 fits
        t.join()
        assert results["slow"] == 200
        assert "dsv2_sequences_in_flight 0.0" in c.get("/metrics").text


def test_per_request_sequence_cap(tiny_lite_dir):
    with make_client(tiny_lite_dir, max_sequences_per_request=8, max_inflight_sequences=64) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["x"] * 2000, "max_tokens": 1})
        err = assert_openai_error(r, 400, "prompt")
        assert err["code"] == "too_many_sequences" and "2000" in err["message"]
        assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "n": 9}), 400, "n")
        assert c.post("/v1/chat/completions", json={**CHAT, "n": 8, "max_tokens": 2}).status_code == 200
    # the budget caps the per-request limit: a request that could never be admitted is a 400, not a 429
    with make_client(tiny_lite_dir, max_sequences_per_request=64, max_inflight_sequences=4) as c:
        assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "n": 5}), 400, "n")


def test_buffered_result_memory_bound(tiny_lite_dir):
    with make_client(tiny_lite_dir, max_model_len=4096, max_buffered_tokens=100_000) as c:
        big = {**CHAT, "n": 64, "logprobs": True, "top_logprobs": 20}
        err = assert_openai_error(c.post("/v1/chat/completions", json=big), 400, "max_tokens")
        assert "top_logprobs" in err["message"] and "100000" in err["message"]
        # the same request streamed holds nothing: accepted
        assert (
            c.post("/v1/chat/completions", json={**big, "stream": True, "max_tokens": 2}).status_code == 200
        )
        # 4 x 100 x 21 = 8400 entries fit
        assert c.post("/v1/chat/completions", json={**big, "n": 4, "max_tokens": 100}).status_code == 200
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["a"] * 4, "n": 8, "max_tokens": 4000})
        assert_openai_error(r, 400, "max_tokens")


def test_engine_dead_gives_503(tiny_lite_dir):
    engine = FakeEngine()
    with make_client(tiny_lite_dir, engine=engine) as c:
        engine.dead = True
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/health").status_code == 503
        assert c.get("/ready").status_code == 503


def test_engine_finish_reason_error(tiny_lite_dir):
    with make_client(tiny_lite_dir, engine=FakeEngine(error_finish=True)) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 500)
        assert err["code"] == "engine_error" and err["type"] == "server_error"
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10})
        assert_openai_error(r, 500)
        events = sse_events(c.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
        assert events[-1]["error"]["code"] == "engine_error"
        assert all("choices" in e for e in events[:-1])
        text = c.get("/metrics").text
        assert 'dsv2_request_failures_total{reason="engine_error",route="/v1/chat/completions"} 2.0' in text
        assert 'dsv2_request_failures_total{reason="engine_error",route="/v1/completions"} 1.0' in text
        assert 'dsv2_aborted_requests_total{reason="error"} 3.0' in text
        assert 'reason="client_disconnected"' not in text


def test_engine_error_mid_stream_is_an_error_event(tiny_lite_dir):
    with make_client(tiny_lite_dir, engine=FakeEngine(fail_after=2)) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(r.text)
        assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
        assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200


def _response_events(text: str) -> list[dict]:
    """A /v1/responses stream: `event:` names equal to the data's type, sequence numbers 0, 1, 2, ..."""
    kinds = [line[len("event: ") :] for line in text.splitlines() if line.startswith("event: ")]
    events = [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    if openai_schema.available():
        for e in events:
            openai_schema.validate("ResponseStreamEvent", e)
    return events


def test_responses_engine_error_mid_stream_is_response_failed(tiny_lite_dir):
    with make_client(tiny_lite_dir, engine=FakeEngine(fail_after=2)) as c:
        r = c.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True})
        events = _response_events(r.text)
        assert [e["type"] for e in events[-3:]] == [
            "response.content_part.done",
            "response.output_item.done",
            "response.failed",
        ]
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert failed["output"][0]["status"] == "incomplete"
        assert failed["output"][0]["content"][0]["text"] == "Hello from"
        ok = c.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 1})
        assert ok.status_code == 200 and ok.json()["status"] == "incomplete"


def test_responses_text_then_calls_are_separate_items(tiny_lite_dir):
    """Text, then two calls: three output items, each opened and closed in order, streamed as in the body."""
    words = [
        "Checking.",
        '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>',
    ]
    tool = {
        "type": "function",
        "name": "f",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
    }
    body = {"model": MODEL, "input": "hi", "tools": [tool]}
    with make_client(tiny_lite_dir, engine=FakeEngine(words=words)) as c:
        whole = c.post("/v1/responses", json=body).json()
        events = _response_events(c.post("/v1/responses", json={**body, "stream": True}).text)
    assert [(i["type"], i.get("arguments")) for i in whole["output"]] == [
        ("message", None),
        ("function_call", '{"x": 1}'),
        ("function_call", '{"x": 2}'),
    ]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == [e["output_index"] for e in done] == [0, 1, 2]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    strip = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]  # noqa: E731
    assert strip(final["output"]) == strip(whole["output"])
    assert [e["item"]["status"] for e in done] == ["completed"] * 3


def test_draining_refuses_new_requests(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        c.app.state.admission.begin_drain()
        err = assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert err["code"] == "shutting_down"
        assert c.get("/ready").status_code == 503
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 200


def test_drain_timeout_aborts_streams_with_an_error_event(tiny_lite_dir):
    engine = FakeEngine(delay=0.3, words=["w"] * 40)
    with make_client(tiny_lite_dir, engine=engine, max_model_len=4096) as c:
        out = {}

        def stream():
            out["r"] = c.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 40})

        t = threading.Thread(target=stream)
        t.start()
        _wait_running(engine)
        while not engine.progress.last_step:  # streaming has begun: the headers are sent
            threading.Event().wait(0.02)
        c.portal.call(c.app.state.admission.drain, 0.2)
        t.join(30)
        assert out["r"].status_code == 200, out["r"].text
        events = sse_events(out["r"].text)
        assert events[-1]["error"]["code"] == "shutting_down"
        assert len(engine.aborted) == 1 and not engine.running
        assert 'dsv2_aborted_requests_total{reason="drain_timeout"} 1.0' in c.get("/metrics").text
        assert (
            'dsv2_request_failures_total{reason="aborted",route="/v1/chat/completions"} 1.0'
            in c.get("/metrics").text
        )


def test_cors(tiny_lite_dir):
    with make_client(tiny_lite_dir, cors_origins=["https://app.example"], api_keys=["k"]) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"


# --- metrics move, readiness and liveness ----------------------------------------------------------------------


def metric(c: TestClient, name: str, **labels: str) -> float:
    """A sample of /metrics. The tests compare counts (requests, tokens, observations) with ==: integers, which
    a float holds exactly."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in c.get("/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


def test_metric_values_move(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        route = "/v1/chat/completions"
        before = metric(c, "dsv2_http_requests_total", method="POST", route=route, status="200")
        ttft = metric(c, "dsv2_time_to_first_token_seconds_count", route=route)
        tokens = metric(c, "dsv2_generation_tokens_total", route=route)
        assert c.post(route, json=CHAT).status_code == 200  # non-streamed: TTFT from the engine's timestamp
        assert metric(c, "dsv2_time_to_first_token_seconds_count", route=route) == ttft + 1
        assert c.post(route, json={**CHAT, "stream": True}).status_code == 200
        assert metric(c, "dsv2_http_requests_total", method="POST", route=route, status="200") == before + 2
        assert metric(c, "dsv2_time_to_first_token_seconds_count", route=route) == ttft + 2
        assert metric(c, "dsv2_generation_tokens_total", route=route) == tokens + 12
        assert metric(c, "dsv2_inter_token_latency_seconds_count", route=route) >= 5
        assert metric(c, "dsv2_e2e_request_latency_seconds_count", route=route) == 2
        c.post(route, json={**CHAT, "n": 1000})
        assert metric(c, "dsv2_http_requests_total", method="POST", route=route, status="400") == 1
        usage = c.post(route, json=CHAT).json()["usage"]
        prompts = metric(c, "dsv2_prompt_tokens_total", route=route)
        assert (
            prompts == 3 * usage["prompt_tokens"]
        )  # the same prompt, three requests that reached the engine


def test_gathered_inter_token_latencies_are_what_observe_gives():
    """A stream's inter-token latencies, gathered and flushed in one go (metrics._Gathered), leave the histogram
    exactly as an observe() of each would: the bucket bounds themselves, values between them and past the last."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.gateway.metrics import _ITL_BUCKETS, _Gathered

    values = [*_ITL_BUCKETS, 0.0, 0.0004, 0.003, 0.0999, 7.0, 1e9, *(i / 1000 for i in range(300))]
    registries = [CollectorRegistry(), CollectorRegistry()]
    plain, gathered = (
        Histogram("itl", "itl", ["route"], buckets=_ITL_BUCKETS, registry=r).labels("/x") for r in registries
    )
    batch = _Gathered(gathered)
    for i, v in enumerate(values):
        plain.observe(v)
        batch.observe(v)
        if i % 97 == 0:
            batch.flush()
    batch.flush()
    batch.flush()  # nothing gathered since: nothing added

    def samples(registry: CollectorRegistry) -> dict:
        text = generate_latest(registry).decode()
        return {
            (s.name, s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    want, got = samples(registries[0]), samples(registries[1])
    sums = got.pop(("itl_sum", None)), want.pop(("itl_sum", None))
    assert sums[0] == pytest.approx(sums[1], rel=1e-12)  # the same values, added in batches
    assert got == want  # every bucket and the count, exactly


def test_an_engine_refusal_is_the_clients_400_on_every_api(tiny_lite_dir, monkeypatch):
    """A request the engine refuses after admission (FakeEngine refuses a negative temperature, as vLLM does what
    its own checks forbid) is a 400 naming the parameter, streamed or not, and never counts as an engine error."""
    from server.gateway import plans

    plain = plans._options

    def negative(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.temperature = -1.0
        return options

    monkeypatch.setattr(plans, "_options", negative)
    with make_client(tiny_lite_dir) as c:
        for stream in (False, True):
            for path, body in [
                ("/v1/chat/completions", CHAT),
                ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}),
                ("/v1/responses", {"model": MODEL, "input": "hi"}),
                ("/v1/messages", {"model": MODEL, "messages": CHAT["messages"], "max_tokens": 4}),
            ]:
                r = c.post(path, json={**body, "stream": stream})
                assert r.status_code == 400 and "temperature" in r.text, (path, stream, r.text)
        assert (
            metric(c, "dsv2_request_failures_total", route="/v1/chat/completions", reason="engine_error") == 0
        )


def test_bodies_are_what_openapi_json_documents(tiny_lite_dir):
    """Every body and chunk the gateway writes validates against the response models /openapi.json is built from
    (server/gateway/bodies.py, which forbids undeclared fields), so the documented shapes cannot drift."""
    from server.gateway import bodies

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = ' <tool_call>{"name":"f","arguments":{"a": 1}}</tool_call>'
    with make_client(tiny_lite_dir, engine=FakeEngine(words=["Hi", call, " there"])) as c:
        for body in (
            {**CHAT, "n": 2, "logprobs": True, "top_logprobs": 1},
            {**CHAT, "tools": tools, "tool_choice": "required"},
        ):
            bodies.ChatCompletion.model_validate(c.post("/v1/chat/completions", json=body).json())
            stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
            for chunk in sse_events(c.post("/v1/chat/completions", json=stream).text):
                bodies.ChatCompletionChunk.model_validate(chunk)
        completion = {"model": MODEL, "prompt": ["a", "b"], "n": 2, "echo": True, "logprobs": 1}
        bodies.Completion.model_validate(c.post("/v1/completions", json=completion).json())
        stream = {**completion, "stream": True, "stream_options": {"include_usage": True}}
        for chunk in sse_events(c.post("/v1/completions", json=stream).text):
            bodies.Completion.model_validate(chunk)
        listed = bodies.ModelList.model_validate(c.get("/v1/models").json())
        bodies.ModelCard.model_validate(c.get(f"/v1/models/{listed.data[0].id}").json())
        bodies.ErrorResponse.model_validate(c.post("/v1/chat/completions", json={**CHAT, "n": 1000}).json())
        bodies.Status.model_validate(c.get("/health").json())
        bodies.Version.model_validate(c.get("/version").json())
    with pytest.raises(ValueError):  # and the models do refuse a field they do not declare
        bodies.Usage.model_validate({"completion_tokens": 1, "prompt_tokens": 1, "total_tokens": 2, "x": 1})


def test_rejections_are_counted_by_reason(tiny_lite_dir):
    engine = FakeEngine(delay=0.5)  # the request holding the budget runs 3 s: the refusals come inside it
    with make_client(tiny_lite_dir, engine=engine, max_inflight_sequences=2) as c:
        t = threading.Thread(target=lambda: c.post("/v1/chat/completions", json={**CHAT, "n": 2}))
        t.start()
        _wait_running(engine)
        for _ in range(3):
            assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 429)
        t.join()
        assert metric(c, "dsv2_rejected_requests_total", reason="overloaded") == 3
        engine.dead = True
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert metric(c, "dsv2_rejected_requests_total", reason="engine_unavailable") == 1
        assert metric(c, "dsv2_rejected_requests_total", reason="overloaded") == 3


def test_multi_prompt_choices_answer_their_own_prompt(tiny_lite_dir):
    """Choice `p * n + i` is prompt p's: FakeEngine's words are the prompt's token ids, so a mix-up shows."""
    prompts = [[11, 12], [21, 22, 23], [31]]
    want = {
        p * 2 + i: "".join(f" t{t}" for t in prompt) for p, prompt in enumerate(prompts) for i in range(2)
    }
    with make_client(tiny_lite_dir, engine=FakeEngine(prompt_words=True, delay=0.01)) as c:
        body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 8}
        choices = c.post("/v1/completions", json=body).json()["choices"]
        assert {ch["index"]: ch["text"] for ch in choices} == want
        streamed: dict[int, str] = {}
        for chunk in sse_events(c.post("/v1/completions", json={**body, "stream": True}).text):
            for ch in chunk["choices"]:
                streamed[ch["index"]] = streamed.get(ch["index"], "") + ch["text"]
        assert streamed == want


def test_cached_tokens_reported_once_on_every_api(tiny_lite_dir):
    """FakeEngine reports 3 prompt tokens as prefix-cache hits, on the first step, per engine request."""
    ask = [{"role": "user", "content": "hi"}]
    with make_client(tiny_lite_dir, engine=FakeEngine(cached_tokens=3)) as c:
        for stream in (False, True):
            body = {
                **CHAT,
                "n": 2,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            r = c.post("/v1/chat/completions", json=body)
            usage = sse_events(r.text)[-1]["usage"] if stream else r.json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 3}, (stream, usage)
            body = {"model": MODEL, "prompt": [[1, 2, 3, 4], [5, 6, 7, 8]], "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            r = c.post("/v1/completions", json=body)
            usage = sse_events(r.text)[-1]["usage"] if stream else r.json()["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 6}, (stream, usage)  # 3 per prompt
            r = c.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": stream})
            body_ = _response_events(r.text)[-1]["response"] if stream else r.json()
            assert body_["usage"]["input_tokens_details"]["cached_tokens"] == 3, (stream, body_["usage"])
        message = c.post("/v1/messages", json={"model": MODEL, "messages": ask, "max_tokens": 8}).json()
        assert message["usage"]["cache_read_input_tokens"] == 3


def test_ready_needs_no_engine_queue_while_busy(tiny_lite_dir):
    """A busy engine that makes steps is ready; /ready answers at once without generating."""
    import time

    engine = FakeEngine(delay=0.05, words=["w"] * 60)
    with make_client(tiny_lite_dir, engine=engine, max_model_len=4096, readiness_window_seconds=1.0) as c:
        assert c.get("/ready").status_code == 200  # idle: a probe generation proves it
        probes = len(engine.generated)
        out = []
        t = threading.Thread(
            target=lambda: out.append(c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60}))
        )
        t.start()
        _wait_running(engine)
        for _ in range(10):
            start = time.monotonic()
            assert c.get("/ready").status_code == 200
            assert time.monotonic() - start < 1.0
            threading.Event().wait(0.2)
        assert len(engine.generated) == probes + 1  # no probe while busy
        t.join()
        assert out[0].status_code == 200


def test_idle_pod_refreshes_its_proof_ahead_without_waiting(tiny_lite_dir):
    import time

    engine = FakeEngine(delay=0.3)  # a probe takes 0.3 s
    with make_client(tiny_lite_dir, engine=engine, readiness_window_seconds=2.0) as c:
        assert (
            c.get("/ready").status_code == 200 and len(engine.generated) == 1
        )  # no proof yet: waits for one
        threading.Event().wait(0.2)
        assert c.get("/ready").status_code == 200 and len(engine.generated) == 1  # fresh proof: no probe
        threading.Event().wait(1.0)  # past half the window: answered at once, a new probe starts behind it
        start = time.monotonic()
        assert c.get("/ready").status_code == 200 and time.monotonic() - start < 0.2
        threading.Event().wait(0.5)
        assert len(engine.generated) == 2


def test_ready_fails_without_leaking_the_probe_error(tiny_lite_dir):
    engine = FakeEngine(fail_after=0)
    with make_client(tiny_lite_dir, engine=engine) as c:
        r = c.get("/ready")
        err = assert_openai_error(r, 503)
        assert err["message"] == "not ready: probe failed" and "fake engine failure" not in r.text


def test_liveness_fails_for_a_stalled_engine(tiny_lite_dir):
    engine = FakeEngine(delay=1.5)
    with make_client(
        tiny_lite_dir, engine=engine, liveness_stall_seconds=0.5, readiness_window_seconds=0.2
    ) as c:
        assert c.get("/health").status_code == 200
        t = threading.Thread(target=lambda: c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}))
        t.start()
        _wait_running(engine)
        threading.Event().wait(0.8)  # in flight, no engine step for 0.8 s > 0.5 s
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "not live: engine stalled"
        assert c.get("/ready").status_code == 503
        t.join()
        assert c.get("/health").status_code == 200  # it stepped, and nothing waits any more


# --- shapes against OpenAI's published schemas -----------------------------------------------------------------


def test_shapes_match_openai_schemas(client):
    openai_schema.require_spec()
    openai_schema.chat_completion(
        client.post("/v1/chat/completions", json={**CHAT, "n": 2, "logprobs": True, "top_logprobs": 1}).json()
    )
    r = client.post(
        "/v1/chat/completions",
        json={
            **CHAT,
            "stream": True,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 1,
            "stream_options": {"include_usage": True},
        },
    )
    for chunk in sse_events(r.text):
        openai_schema.chat_chunk(chunk)
    openai_schema.completion(
        client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "logprobs": 1}).json()
    )
    chunks = sse_events(
        client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "stream": True}).text
    )
    for chunk in chunks:
        openai_schema.completion_chunk(chunk)


# --- tool calls: parsing and shapes (the real engine's guided decoding: test_gateway_tools.py) -----------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}
CALL_WORDS = [" ", "<tool_", 'call>{"name":"get_weather",', '"arguments":{"city":', '"Paris"}}</tool_call>']


def test_tool_call_shapes_streamed_and_not(tiny_lite_dir):
    import json as json_

    engine = FakeEngine(words=CALL_WORDS)
    with make_client(tiny_lite_dir, engine=engine) as c:
        body = {**CHAT, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
        whole = c.post("/v1/chat/completions", json=body).json()
        tag = json_.loads(engine.options[-1].structural_tag)
        assert tag["format"]["elements"][1]["stop_after_first"] is True  # parallel_tool_calls: false
        choice = whole["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
        chunks = sse_events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
        deltas = [ch["choices"][0]["delta"] for ch in chunks]
        first = next(d["tool_calls"][0] for d in deltas if "tool_calls" in d)
        assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
        assert first["function"] == {"name": "get_weather", "arguments": ""}
        args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
        assert args == '{"city":"Paris"}'
        assert not any(d.get("content") for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        if openai_schema.available():
            openai_schema.chat_completion(whole)
            for chunk in chunks:
                openai_schema.chat_chunk(chunk)
        # auto: text before the call stays content; tool_choice none: no parsing at all
        engine.words = ["Let me check.", *CALL_WORDS]
        msg = c.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER]}).json()["choices"][0][
            "message"
        ]
        assert msg["content"] == "Let me check." and msg["tool_calls"][0]["function"]["name"] == "get_weather"
        assert json_.loads(engine.options[-1].structural_tag)["format"]["type"] == "triggered_tags"
        msg = c.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER], "tool_choice": "none"}).json()
        assert "tool_calls" not in msg["choices"][0]["message"] and engine.options[-1].structural_tag is None


def test_playground_served_and_switched_off(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        for path in ("/", "/playground"):
            r = c.get(path)
            assert r.status_code == 200 and "<title>dsv2-serve playground</title>" in r.text
            assert "script-src 'self'" in r.headers["content-security-policy"]
        assert c.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")
        assert_openai_error(c.get("/playground/secret.py"), 404)
        assert "/playground" not in c.get("/openapi.json").json()["paths"]
    with make_client(tiny_lite_dir, playground=False) as c:
        assert_openai_error(c.get("/"), 404)
        assert_openai_error(c.get("/playground/playground.js"), 404)


# --- the Anthropic Messages path: auth and shapes (the real engine: test_gateway_anthropic.py) ------------------

MSG = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def test_messages_auth_and_error_shape(tiny_lite_dir):
    with make_client(tiny_lite_dir, api_keys=["k1"]) as c:
        r = c.post("/v1/messages", json=MSG)
        assert r.status_code == 401
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/messages", json=MSG, headers={"x-api-key": "k1", "anthropic-version": "2023-06-01"})
        body = r.json()
        assert r.status_code == 200 and body["type"] == "message" and body["stop_reason"] == "end_turn"
        assert body["content"] == [{"type": "text", "text": "Hello from the fake engine."}]
        assert body["usage"]["output_tokens"] == 6
        assert c.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "k2"}).status_code == 401
        r = c.post("/v1/messages", json={**MSG, "max_tokens": "x"}, headers={"x-api-key": "k1"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in r.json()["error"]["message"]
        r = c.post(
            "/v1/messages/count_tokens",
            json={"model": MODEL, "messages": MSG["messages"]},
            headers={"x-api-key": "k1"},
        )
        assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_messages_stream_events(tiny_lite_dir):
    engine = FakeEngine(words=["Let me see.", *CALL_WORDS])
    with make_client(tiny_lite_dir, engine=engine) as c:
        tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]
        r = c.post("/v1/messages", json={**MSG, "stream": True, "tools": tools})
        kinds, datas = [], []
        for block in r.text.strip().split("\n\n"):
            kind, data = block.split("\n")
            kinds.append(kind.removeprefix("event: "))
            datas.append(json.loads(data.removeprefix("data: ")))
        assert kinds == [
            "message_start", "ping",
            "content_block_start", "content_block_delta", "content_block_stop",
            "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
            "message_delta", "message_stop",
        ]  # fmt: skip
        assert datas[3]["delta"] == {"type": "text_delta", "text": "Let me see."}
        assert (
            datas[5]["content_block"]["type"] == "tool_use"
            and datas[5]["content_block"]["name"] == "get_weather"
        )
        args = "".join(d["delta"]["partial_json"] for d in datas[6:8])
        assert json.loads(args) == {"city": "Paris"}
        assert datas[-2]["delta"]["stop_reason"] == "tool_use"
