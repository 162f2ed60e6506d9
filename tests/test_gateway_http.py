"""HTTP unit tests of the gateway over FakeEngine (tests/fake_engine.py): auth, limits, error shapes, SSE
framing, request ids, drain. No vLLM engine here; behaviour with the real engine is in test_gateway_engine.py.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from starlette.testclient import TestClient

from server.gateway.app import create_app
from server.settings import Settings
from tests.fake_engine import FakeEngine

MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def make_client(model_dir, engine: FakeEngine | None = None, **settings) -> TestClient:
    s = Settings(model=str(model_dir), served_model_name=MODEL, **settings)
    return TestClient(create_app(s, engine=engine or FakeEngine()), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        yield c


def assert_openai_error(r, status: int, param: str | None = "__any__") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
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
        ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({**CHAT, "temperature": 5}, 400, "temperature"),
        ({**CHAT, "top_p": 0}, 400, "top_p"),
        ({**CHAT, "n": 0}, 400, "n"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 10_000}, 400, "messages"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
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


def test_models_health_version_metrics(client):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 256
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert "version" in client.get("/version").json()
    text = client.get("/metrics").text
    assert 'dsv2_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "dsv2_time_to_first_token_seconds_bucket" in text


def test_request_id_echoed(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert client.get("/health").headers["x-request-id"]


def test_auth(tiny_lite_dir):
    with make_client(tiny_lite_dir, api_keys=["k1", "k2"]) as c:
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 401)
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


def test_overload_gives_429_with_retry_after(tiny_lite_dir):
    engine = FakeEngine(delay=0.2)
    with make_client(tiny_lite_dir, engine=engine, max_concurrent_requests=1) as c:
        results = {}

        def slow():
            results["slow"] = c.post("/v1/chat/completions", json=CHAT).status_code

        t = threading.Thread(target=slow)
        t.start()
        for _ in range(100):
            if engine.running:
                break
            threading.Event().wait(0.02)
        r = c.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        t.join()
        assert results["slow"] == 200


def test_engine_dead_gives_503(tiny_lite_dir):
    engine = FakeEngine()
    with make_client(tiny_lite_dir, engine=engine) as c:
        engine.dead = True
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/health").status_code == 503
        assert c.get("/ready").status_code == 503


def test_engine_error_mid_stream_is_an_error_event(tiny_lite_dir):
    with make_client(tiny_lite_dir, engine=FakeEngine(fail_after=2)) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = sse_events(r.text)
        assert "error" in events[-1] and events[-1]["error"]["type"] == "server_error"
        assert c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1}).status_code == 200


def test_draining_refuses_new_requests(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        c.app.state.gateway.begin_drain()
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 503)
        assert c.get("/ready").status_code == 503
        assert c.get("/health").status_code == 200


async def test_drain_waits_then_aborts(tiny_lite_dir):
    from server.gateway.metrics import GatewayMetrics
    from server.gateway.serving import Flight, Gateway

    gw = Gateway(Settings(model=str(tiny_lite_dir)), GatewayMetrics())
    gw.engine = FakeEngine()
    gw.flights["x"] = Flight("x")
    await asyncio.wait_for(gw.drain(0.2), 10)
    assert gw.engine.aborted == ["x"] and gw.draining


def test_cors(tiny_lite_dir):
    with make_client(tiny_lite_dir, cors_origins=["https://app.example"], api_keys=["k"]) as c:
        r = c.options(
            "/v1/chat/completions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
