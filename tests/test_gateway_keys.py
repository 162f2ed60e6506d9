"""Many clients on one server, over FakeEngine (HTTP unit tests only): named keys from a file, per-key limits with
OpenAI's x-ratelimit-* headers, per-key usage in /metrics, model aliases, CORS, deadlines, priority checks and
usage details. The same with the real engine (priority ordering, cache salts, tokens) is test_gateway_tenants.py.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time

import pytest
from starlette.testclient import TestClient

from server.gateway.app import create_app
from server.settings import Settings
from tests import openai_schema
from tests.fake_engine import FakeEngine
from tests.test_gateway_http import MODEL, assert_openai_error, make_client, metric, sse_events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys.yaml"
    hashed = hashlib.sha256(b"sk-batch").hexdigest()
    path.write_text(
        "team-a: sk-a\n"
        "team-b:\n"
        "  key: sk-b\n"
        "  requests_per_minute: 2\n"
        "  models: [deepseek-chat]\n"
        "batch:\n"
        f"  key_sha256: {hashed}\n"
        "  tokens_per_minute: 40\n"
        "  max_sequences: 2\n"
        "  priority: 5\n"
        "  min_priority: 1\n"
    )
    return path


def test_named_keys_limits_headers_and_usage(tiny_lite_dir, key_file, caplog):
    with make_client(
        tiny_lite_dir,
        api_key_file=str(key_file),
        api_keys=["sk-flat"],
        served_model_name=f"{MODEL},deepseek-chat",
    ) as c:
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT), 401)
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-nope")), 401)
        with caplog.at_level(logging.INFO, logger="dsv2.access"):
            assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code == 200
        assert any("team-a" in r.getMessage() and "sk-a" not in r.getMessage() for r in caplog.records)
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-flat")).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "sk-a"}).status_code == 200

        # team-b: only the alias deepseek-chat, 2 requests per minute
        err = assert_openai_error(
            c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-b")), 403, "model"
        )
        assert "team-b" in err["message"]
        ok = c.post("/v1/chat/completions", json={**CHAT, "model": "deepseek-chat"}, headers=bearer("sk-b"))
        assert ok.status_code == 200 and ok.json()["model"] == "deepseek-chat"  # the name asked for
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == "0"
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
        limited = c.post(
            "/v1/chat/completions", json={**CHAT, "model": "deepseek-chat"}, headers=bearer("sk-b")
        )
        err = assert_openai_error(limited, 429)
        assert err["code"] == "rate_limit_exceeded" and "requests per minute" in err["message"]
        assert 1 <= int(limited.headers["retry-after"]) <= 30
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        # other keys are not affected
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code == 200

        # batch (hashed key): 40 tokens per minute. A request reserves its worst case (prompt + max_tokens; left
        # out, max_tokens is the rest of the context) and is charged what it used: the prompt and FakeEngine's
        # 6 words. A worst case above a minute's allowance can never fit: a 400 that says which parameter.
        err = assert_openai_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-batch")), 400)
        assert err["param"] == "max_tokens" and "40 tokens per minute" in err["message"], err
        first = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}, headers=bearer("sk-batch"))
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        assert used == first.json()["usage"]["prompt_tokens"] + 6
        remaining = int(first.headers["x-ratelimit-remaining-tokens"])
        assert 40 - used <= remaining <= 40 - used + 1  # settled before the body was sent; refills 2/3 per s
        again = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}, headers=bearer("sk-batch"))
        err = assert_openai_error(again, 429)
        assert "tokens per minute" in err["message"] and int(again.headers["retry-after"]) >= 1

        metrics = c.get("/metrics").text
        assert 'dsv2_key_requests_total{key="team-a"} 3.0' in metrics
        assert 'dsv2_key_requests_total{key="key-1"} 1.0' in metrics
        assert 'dsv2_key_rate_limited_total{key="team-b"} 1.0' in metrics
        assert 'dsv2_key_rate_limited_total{key="batch"} 2.0' in metrics
        usage = first.json()["usage"]
        assert f'dsv2_key_prompt_tokens_total{{key="batch"}} {float(usage["prompt_tokens"])}' in metrics
        assert (
            f'dsv2_key_generation_tokens_total{{key="batch"}} {float(usage["completion_tokens"])}' in metrics
        )
        assert "sk-" not in metrics


@pytest.mark.parametrize("exit_by", ["deadline", "engine_failure", "completed"])
def test_tokens_charged_on_every_exit(tiny_lite_dir, tmp_path, exit_by):
    """A stream's worst case is reserved while it runs; however it ends, the key is charged its prompt and the
    tokens generated up to then, and the rest of the reservation comes back."""
    path = tmp_path / "keys.yaml"
    path.write_text("meter:\n  key: sk-m\n  tokens_per_minute: 60\n")  # refills 1 token per second
    # 0.3 s a token: the stream runs long enough to be seen in flight, and the deadline (1 s) cuts it after
    # three tokens with a wide margin on a busy machine.
    engine = FakeEngine(delay=0.3, fail_after=3 if exit_by == "engine_failure" else None)
    with make_client(tiny_lite_dir, engine=engine, api_key_file=str(path)) as c:
        headers = bearer("sk-m") | ({"X-Request-Timeout": "1.0"} if exit_by == "deadline" else {})
        body = {**CHAT, "stream": True, "max_tokens": 30}
        seen = []

        def remaining() -> int:
            return int(c.get("/v1/models", headers=bearer("sk-m")).headers["x-ratelimit-remaining-tokens"])

        thread = threading.Thread(
            target=lambda: seen.append(c.post("/v1/chat/completions", json=body, headers=headers))
        )
        started = time.monotonic()
        thread.start()
        while not engine.running:
            time.sleep(0.01)
        in_flight, in_flight_at = remaining(), math.ceil(time.monotonic() - started)
        thread.join()
        events = sse_events(seen[0].text)
        delivered = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
        assert ("error" in events[-1]) == (exit_by != "completed"), events[-1]
        assert 0 < delivered <= (6 if exit_by == "completed" else 4)
        prompt = metric(c, "dsv2_key_prompt_tokens_total", key="meter")
        assert prompt > 0 and metric(c, "dsv2_key_generation_tokens_total", key="meter") == delivered
        assert in_flight <= 60 - prompt - 30 + in_flight_at  # the worst case, held while the stream ran
        used = int(prompt) + delivered
        left = remaining()
        refilled = math.ceil(time.monotonic() - started)  # 1 token per second since the reservation
        assert 60 - used <= left <= 60 - used + refilled  # charged what it used, the rest given back


@pytest.mark.parametrize("isolation", [True, False])
def test_cache_salt_reaches_the_engine_per_key(tiny_lite_dir, key_file, isolation):
    """With keys, every engine request carries its key's salt (one per key, on every API); with
    --no-cache-isolation, or without keys, none."""
    engine = FakeEngine()
    settings = {"api_key_file": str(key_file), "api_keys": ["sk-flat"], "cache_isolation": isolation}
    with make_client(tiny_lite_dir, engine=engine, **settings) as c:
        salts = {}
        for key in ("sk-a", "sk-flat"):
            for path, body in [
                ("/v1/chat/completions", {**CHAT, "max_tokens": 2}),
                ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2}),
                ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2}),
                ("/v1/messages", {"model": MODEL, "messages": CHAT["messages"], "max_tokens": 2}),
            ]:
                seen = len(engine.options)
                assert c.post(path, json=body, headers=bearer(key)).status_code == 200, (path, key)
                salts.setdefault(key, set()).update(o.cache_salt for o in engine.options[seen:])
        if isolation:
            assert all(len(s) == 1 and None not in s for s in salts.values()), salts
            assert salts["sk-a"] != salts["sk-flat"]
        else:
            assert salts == {"sk-a": {None}, "sk-flat": {None}}
    with make_client(tiny_lite_dir, engine=engine) as c:  # no keys: nothing to isolate
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert engine.options[-1].cache_salt is None


def test_count_tokens_goes_through_the_key(tiny_lite_dir, key_file):
    """/v1/messages/count_tokens reads the model's tokenizer like a request: a key may count only for the models
    it may use, and each count is a request of its requests_per_minute."""
    with make_client(
        tiny_lite_dir, api_key_file=str(key_file), served_model_name=f"{MODEL},deepseek-chat"
    ) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = c.post("/v1/messages/count_tokens", json=body, headers=bearer("sk-b"))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
        body["model"] = "deepseek-chat"
        statuses = [
            c.post("/v1/messages/count_tokens", json=body, headers=bearer("sk-b")).status_code
            for _ in range(2)
        ]
        assert statuses == [200, 429]  # team-b: 2 requests per minute, the first spent on the refused model
        assert (
            metric(
                c, "dsv2_http_requests_total", method="POST", route="/v1/messages/count_tokens", status="429"
            )
            == 1
        )


def test_key_priority_default_and_cap(tiny_lite_dir, key_file):
    engine = FakeEngine(delay=0.05)
    engine.priority_scheduling = True
    with make_client(tiny_lite_dir, engine=engine, api_key_file=str(key_file)) as c:
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-a")).status_code == 200
        assert engine.options[-1].priority == 0
        c.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 1},
            headers=bearer("sk-batch"),
        )
        assert engine.options[-1].priority == 5  # the key's default
        err = assert_openai_error(
            c.post("/v1/chat/completions", json={**CHAT, "priority": 0}, headers=bearer("sk-batch")),
            400,
            "priority",
        )
        assert "batch" in err["message"] and "1" in err["message"]
        engine.priority_scheduling = False
        err = assert_openai_error(
            c.post("/v1/chat/completions", json={**CHAT, "priority": 3}, headers=bearer("sk-a")),
            400,
            "priority",
        )
        assert "--scheduling-policy priority" in err["message"]


def test_key_concurrent_sequences(tiny_lite_dir, tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("solo:\n  key: sk-solo\n  max_sequences: 2\nother: sk-other\n")
    engine = FakeEngine(delay=0.3)
    with make_client(tiny_lite_dir, engine=engine, api_key_file=str(path)) as c:
        err = assert_openai_error(
            c.post("/v1/chat/completions", json={**CHAT, "n": 3}, headers=bearer("sk-solo")), 429
        )
        assert "solo" in err["message"]
        results = []
        t = threading.Thread(
            target=lambda: results.append(
                c.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=bearer("sk-solo")).status_code
            )
        )
        t.start()
        time.sleep(0.5)
        assert_openai_error(c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-solo")), 429)
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-other")).status_code == 200
        t.join()
        assert results == [200]
        assert c.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-solo")).status_code == 200


@pytest.mark.parametrize(
    "text,needle",
    [
        ("team: ''\n", "non-empty"),
        ("team:\n  key: a\n  key_sha256: " + "0" * 64 + "\n", "exactly one"),
        ("team:\n  key_sha256: abc\n", "64 hex"),
        ("team:\n  key: a\n  requests_per_minute: 0\n", "requests_per_minute"),
        ("team:\n  key: a\n  rpm: 5\n", "unknown field"),
        ("a: same\nb: same\n", "two names"),
        ("- just a list\n", "mapping"),
        ("team: [unclosed\n", "keys.yaml"),
        ("team:\n  key: a\n  admin: 'yes'\n", "admin must be true or false"),
        ("team:\n  key: a\n  admin: 1\n", "admin must be true or false"),
    ],
)
def test_bad_key_file_refuses_to_start(tiny_lite_dir, tmp_path, text, needle):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=needle):
        create_app(Settings(model=str(tiny_lite_dir), api_key_file=str(path)), engine=FakeEngine())


def test_aliases_listed_hidden_and_reported(tiny_lite_dir):
    with make_client(
        tiny_lite_dir, served_model_name=f"{MODEL},deepseek-chat", hidden_model_aliases="gpt-4o-mini"
    ) as c:
        listed = c.get("/v1/models").json()
        if openai_schema.available():
            openai_schema.model_list(listed)
        assert [m["id"] for m in listed["data"]] == [MODEL, "deepseek-chat"]
        assert c.get("/v1/models/gpt-4o-mini").json()["id"] == "gpt-4o-mini"
        for name in (MODEL, "deepseek-chat", "gpt-4o-mini"):
            body = c.post("/v1/chat/completions", json={**CHAT, "model": name}).json()
            assert body["model"] == name
            chunks = sse_events(
                c.post("/v1/completions", json={"model": name, "prompt": "x", "stream": True}).text
            )
            assert {ch["model"] for ch in chunks} == {name}
        assert (
            c.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "x"}).json()["model"]
            == "gpt-4o-mini"
        )
        assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}), 404, "model")


def test_cors_preflight_with_authorization(tiny_lite_dir):
    with make_client(tiny_lite_dir, cors_origins="https://app.example", api_keys=["sk-a"]) as c:
        pre = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = c.post(
            "/v1/chat/completions", json=CHAT, headers={**bearer("sk-a"), "Origin": "https://app.example"}
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        other = c.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with make_client(tiny_lite_dir) as c:  # off by default
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_deadlines(tiny_lite_dir):
    engine = FakeEngine(delay=0.2, words=["w"] * 50)
    with make_client(tiny_lite_dir, engine=engine, max_model_len=4096, max_request_seconds=30) as c:
        started = time.monotonic()
        r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": "0.5"})
        err = assert_openai_error(r, 504)
        assert err["code"] == "deadline_exceeded" and err["type"] == "timeout_error"
        assert time.monotonic() - started < 3
        stream = c.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"X-Request-Timeout": "0.5"}
        )
        events = sse_events(stream.text)  # ends with [DONE]
        assert events[-1]["error"]["code"] == "deadline_exceeded"
        assert_openai_error(
            c.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": "soon"}),
            400,
            "X-Request-Timeout",
        )
        deadline_time = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline_time:
            time.sleep(0.05)
        assert not engine.running and len(engine.aborted) >= 2  # the engine requests were aborted
        metrics = c.get("/metrics").text
        assert 'dsv2_request_failures_total{reason="deadline",route="/v1/chat/completions"} 2.0' in metrics
        assert 'dsv2_aborted_requests_total{reason="deadline"} 2.0' in metrics
    with make_client(tiny_lite_dir, engine=FakeEngine(delay=0.2, words=["w"] * 50), max_model_len=4096,
                     max_request_seconds=0.5) as c:  # fmt: skip
        assert_openai_error(
            c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50}), 504
        )


def test_usage_details_and_forced_usage(tiny_lite_dir):
    with make_client(tiny_lite_dir, force_include_usage=True) as c:
        body = c.post("/v1/chat/completions", json=CHAT).json()
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        chunks = sse_events(c.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert all(ch["usage"] is None for ch in chunks[:-1])
        chunks = sse_events(
            c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}).text
        )
        assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 6
        if openai_schema.available():
            openai_schema.chat_completion(body)


def test_continuous_usage_stats(tiny_lite_dir):
    with make_client(tiny_lite_dir) as c:
        options = {"include_usage": True, "continuous_usage_stats": True}
        chunks = sse_events(
            c.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options}).text
        )
        running = [ch["usage"]["completion_tokens"] for ch in chunks[:-1]]
        assert running == sorted(running) and running[-1] == 6 and running[1] == 1  # one word per step
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        prompt = chunks[-1]["usage"]["prompt_tokens"]
        assert {ch["usage"]["prompt_tokens"] for ch in chunks} == {prompt}
        if openai_schema.available():
            for ch in chunks:
                openai_schema.chat_chunk(ch)
        chunks = sse_events(
            c.post(
                "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "x",
                    "stream": True,
                    "stream_options": {"continuous_usage_stats": True},
                },
            ).text
        )
        assert [ch["usage"]["completion_tokens"] for ch in chunks] == [1, 2, 3, 4, 5, 6]


def test_tracing_spans_follow_the_request(tiny_lite_dir):
    """OpenTelemetry with the SDK's in-memory exporter: the request's span continues the caller's traceparent and
    carries the request id; admission, template, and the engine's queue, prefill and decode are its children."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(model=str(tiny_lite_dir), served_model_name=MODEL, api_keys=["sk-a"])
    app = create_app(settings, engine=FakeEngine(delay=0.01), tracer=provider.get_tracer("test"))
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {**bearer("sk-a"), "traceparent": f"00-{trace_id}-{parent_id}-01", "X-Request-Id": "trace-me"}
    with TestClient(app) as c:
        assert (
            c.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers).status_code == 200
        )
        assert (
            c.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=bearer("sk-a")
            ).status_code
            == 200
        )
        assert (
            c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0}, headers=headers).status_code == 400
        )
    spans = exporter.get_finished_spans()
    chat = [s for s in spans if s.context.trace_id == int(trace_id, 16)]
    by_name = {s.name: s for s in chat}
    assert set(by_name) == {
        "POST /v1/chat/completions",
        "admission",
        "template",
        "queue",
        "prefill",
        "decode",
    }
    root = by_name["POST /v1/chat/completions"]
    assert root.parent.span_id == int(parent_id, 16)
    assert root.attributes["dsv2.request_id"] == "trace-me" and root.attributes["dsv2.key"] == "key-1"
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    for name in ("admission", "template", "queue", "prefill", "decode"):
        assert by_name[name].parent.span_id == root.context.span_id
    assert by_name["queue"].start_time <= by_name["prefill"].start_time <= by_name["decode"].start_time
    assert by_name["decode"].end_time <= root.end_time  # the root ends with the stream
    completion = [s for s in spans if s.name == "POST /v1/completions"]
    assert len(completion) == 1 and completion[0].context.trace_id != int(trace_id, 16)  # a trace of its own


def test_serve_refuses_a_bad_key_file_before_starting_the_engine(tiny_lite_dir, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "keys.yaml"
    path.write_text("a: same\nb: same\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(tiny_lite_dir), "--api-key-file", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "the same API key is given to two names" in proc.stdout + proc.stderr


# --- the runtime LoRA API: admin keys, allowed directories, hub ids, a cap ------------------------------------


def fake_adapter(where) -> str:
    """A directory FakeEngine takes for a LoRA adapter (the gateway checks for adapter_config.json only)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "adapter_config.json").write_text("{}")
    return str(where)


def load(c: TestClient, name: str, path: str, key: str | None = None):
    headers = bearer(key) if key else {}
    return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=headers)


def unload(c: TestClient, name: str, key: str | None = None):
    return c.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=bearer(key) if key else {})


def test_admin_attribute(tmp_path):
    from server.gateway.tenants import load as load_tenants

    path = tmp_path / "keys.yaml"
    path.write_text("ops:\n  key: sk-ops\n  admin: true\nteam:\n  key: sk-t\n  admin: false\nplain: sk-p\n")
    tenants = {t.name: t for t in load_tenants(["sk-flat"], str(path)).tenants}
    assert {name: t.admin for name, t in tenants.items()} == {
        "key-1": False,  # flat keys are never admins
        "ops": True,
        "team": False,
        "plain": False,
    }


def test_runtime_lora_api_is_for_admin_keys_only(tiny_lite_dir, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("ops:\n  key: sk-ops\n  admin: true\nteam: sk-team\n")
    adapter = fake_adapter(tmp_path / "adapters" / "a")
    engine = FakeEngine()
    with make_client(
        tiny_lite_dir,
        engine=engine,
        api_keys=["sk-flat"],
        api_key_file=str(keys),
        allow_runtime_lora_updating=True,
        lora_adapter_dirs=[str(tmp_path / "adapters")],
    ) as c:
        assert_openai_error(load(c, "a", adapter), 401)
        for key in ("sk-team", "sk-flat"):
            for r in (load(c, "a", adapter, key), unload(c, "a", key)):
                err = assert_openai_error(r, 403, None)
                assert err["code"] == "admin_key_required" and err["type"] == "invalid_request_error"
                assert "admin: true" in err["message"]
        assert engine.adapters == {}
        assert load(c, "a", adapter, "sk-ops").status_code == 200
        assert_openai_error(unload(c, "a", "sk-team"), 403, None)
        assert "a" in engine.adapters
        # any key may use the adapter, as any model its `models` allows
        chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=chat, headers=bearer("sk-team")).status_code == 200
        assert unload(c, "a", "sk-ops").status_code == 200
        assert engine.adapters == {}


def test_runtime_lora_api_is_open_without_keys(tiny_lite_dir, tmp_path):
    adapter = fake_adapter(tmp_path / "adapters" / "a")
    with make_client(
        tiny_lite_dir, allow_runtime_lora_updating=True, lora_adapter_dirs=[str(tmp_path / "adapters")]
    ) as c:
        assert load(c, "a", adapter).status_code == 200
        assert unload(c, "a").status_code == 200


def test_runtime_lora_path_must_lie_in_lora_adapter_dirs(tiny_lite_dir, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    inside = fake_adapter(allowed / "good")
    escaped = fake_adapter(outside / "evil")
    (allowed / "link-out").symlink_to(outside / "evil", target_is_directory=True)
    (allowed / "link-in").symlink_to(allowed / "good", target_is_directory=True)
    (allowed / "dir-link").symlink_to(outside, target_is_directory=True)
    engine = FakeEngine()
    with make_client(
        tiny_lite_dir, engine=engine, allow_runtime_lora_updating=True, lora_adapter_dirs=[str(allowed)]
    ) as c:
        for path in (
            escaped,  # another directory
            f"{allowed}/../outside/evil",  # `..` out of it
            str(allowed / "link-out"),  # a symlink out of it
            str(allowed / "dir-link" / "evil"),  # through a symlinked directory
            str(tmp_path),  # its parent
            "/etc",
        ):
            err = assert_openai_error(load(c, "x", path), 400, "lora_path")
            assert "--lora-adapter-dirs" in err["message"], path
        assert engine.adapters == {}
        assert load(c, "in", inside).status_code == 200
        assert load(c, "via-link", str(allowed / "link-in")).status_code == 200  # a symlink that stays inside
        assert load(c, "dotted", f"{allowed}/x/../good").status_code == 200
        # the engine loads the resolved path, so the link cannot be swapped after the check
        assert set(engine.adapters.values()) == {os.path.realpath(inside)}
        assert_openai_error(load(c, "y", str(allowed / "missing")), 400, "lora_path")  # inside, no adapter

    # no --lora-adapter-dirs: no local path at all
    with make_client(tiny_lite_dir, engine=FakeEngine(), allow_runtime_lora_updating=True) as c:
        err = assert_openai_error(load(c, "in", inside), 400, "lora_path")
        assert "--lora-adapter-dirs" in err["message"]


def test_runtime_lora_hub_ids_need_the_flag(tiny_lite_dir):
    engine = FakeEngine()
    with make_client(tiny_lite_dir, engine=engine, allow_runtime_lora_updating=True) as c:
        err = assert_openai_error(load(c, "x", "org/adapter"), 400, "lora_path")
        assert "--allow-lora-hub-ids" in err["message"]
    assert engine.adapters == {}
    with make_client(
        tiny_lite_dir, engine=engine, allow_runtime_lora_updating=True, allow_lora_hub_ids=True
    ) as c:
        assert load(c, "x", "org/adapter").status_code == 200
        assert engine.adapters == {"x": "org/adapter"}
        for bad in ("org/../adapter", "not a repo", "a/b/c", "org/adäpter", "org/a\x00b", "/etc\x00"):
            assert_openai_error(load(c, "y", bad), 400, "lora_path")
        assert_openai_error(load(c, "y", "org/broken-adapter"), 400, "lora_path")  # the engine refuses it
        # a local path still has to lie in --lora-adapter-dirs (none here)
        assert_openai_error(load(c, "y", "/etc"), 400, "lora_path")


def test_runtime_adapters_cap(tiny_lite_dir, tmp_path):
    static = fake_adapter(tmp_path / "static")
    paths = [fake_adapter(tmp_path / "adapters" / f"a{i}") for i in range(3)]
    engine = FakeEngine()
    with make_client(
        tiny_lite_dir,
        engine=engine,
        allow_runtime_lora_updating=True,
        lora_modules=[f"static={static}"],
        lora_adapter_dirs=[str(tmp_path)],
        max_runtime_adapters=2,
    ) as c:
        assert load(c, "a0", paths[0]).status_code == 200
        assert load(c, "a1", paths[1]).status_code == 200  # --lora-modules' adapter does not count
        err = assert_openai_error(load(c, "a2", paths[2]), 400, None)
        assert err["code"] == "too_many_adapters" and "--max-runtime-adapters" in err["message"]
        assert set(engine.adapters) == {"static", "a0", "a1"}
        # a --lora-modules adapter unloaded and loaded again takes back its own place
        assert unload(c, "static").status_code == 200
        assert load(c, "static", static).status_code == 200
        assert unload(c, "a0").status_code == 200
        assert load(c, "a2", paths[2]).status_code == 200
    with make_client(
        tiny_lite_dir,
        allow_runtime_lora_updating=True,
        lora_adapter_dirs=[str(tmp_path)],
        max_runtime_adapters=0,
    ) as c:
        assert_openai_error(load(c, "a0", paths[0]), 400, None)


def test_models_show_no_paths(tiny_lite_dir, tmp_path):
    static = fake_adapter(tmp_path / "static")
    loaded = fake_adapter(tmp_path / "adapters" / "a")
    with make_client(
        tiny_lite_dir,
        served_model_name=f"{MODEL},deepseek-chat",
        allow_runtime_lora_updating=True,
        lora_modules=[f"static={static}"],
        lora_adapter_dirs=[str(tmp_path)],
    ) as c:
        assert load(c, "a", loaded).status_code == 200
        listed = c.get("/v1/models")
        cards = {m["id"]: m for m in listed.json()["data"]}
        assert {name: (m["root"], m["parent"]) for name, m in cards.items()} == {
            MODEL: (MODEL, None),
            "deepseek-chat": (MODEL, None),
            "static": ("static", MODEL),
            "a": ("a", MODEL),
        }
        for text in (listed.text, *(c.get(f"/v1/models/{name}").text for name in cards)):
            for path in (str(tiny_lite_dir), str(tmp_path), tiny_lite_dir.name, "/"):
                assert path not in text.replace("\\/", "/"), (path, text)


# --- authentication cannot be turned off by accident ----------------------------------------------------------


def test_no_keys_off_loopback_needs_allow_unauthenticated(tiny_lite_dir, tmp_path):
    def app(**settings):
        return create_app(Settings(model=str(tiny_lite_dir), **settings), engine=FakeEngine())

    for host in ("0.0.0.0", "::", "10.1.2.3", "example.internal"):
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            app(host=host)
        app(host=host, allow_unauthenticated=True)
        app(host=host, api_keys=["sk-a"])
    keys = tmp_path / "keys.yaml"
    keys.write_text("team: sk-a\n")
    app(host="0.0.0.0", api_key_file=str(keys))
    for host in ("127.0.0.1", "::1", "localhost"):
        app(host=host)


def test_serve_without_keys_off_loopback_stops_before_the_engine(tiny_lite_dir):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV2_")}
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(tiny_lite_dir), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "--allow-unauthenticated" in out, out
    assert "starting vLLM engine" not in out and "Traceback" not in out


def test_keys_and_lora_rules_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    section = doc.split("### Keys and the runtime LoRA API", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "admin: true",
        "--lora-adapter-dirs",
        "--allow-lora-hub-ids",
        "--max-runtime-adapters",
        "admin_key_required",
        "too_many_adapters",
    ):
        assert needle in section, needle
    auth = doc.split("## Authentication and API keys", 1)[1].split("\n## ", 1)[0]
    assert "--allow-unauthenticated" in auth and "admin: true" in auth
