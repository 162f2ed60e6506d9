"""Many clients on one server, with the real vLLM engine: `python -m server serve` on the tiny checkpoint with a key
file, model aliases, vLLM's priority scheduling and one sequence at a time, so the queue order is visible.
The HTTP-level behaviour (limits, headers, CORS, errors) is tested over FakeEngine in test_gateway_keys.py.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.test_gateway_engine import MODEL, Server, metric, metric_exact, start_server, wait_for

pytestmark = pytest.mark.engine

KEYS = (
    "interactive: sk-i\n"
    "batch:\n  key: sk-b\n  priority: 10\n  min_priority: 5\n"
    "metered:\n  key: sk-m\n  requests_per_minute: 2\n"
)
ORIGIN = "https://app.example"


class OTLPCollector:
    """An OTLP/HTTP trace receiver on localhost: the spans the server exports, decoded."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1/traces"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def collector():
    c = OTLPCollector()
    yield c
    c.httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_lite_dir, tmp_path_factory, collector):
    root = tmp_path_factory.mktemp("tenants")
    (root / "keys.yaml").write_text(KEYS)
    srv = start_server(
        tiny_lite_dir,
        root / "server.log",
        "--api-key-file", str(root / "keys.yaml"),
        "--served-model-name", f"{MODEL},deepseek-chat",
        "--scheduling-policy", "priority",
        "--max-num-seqs", "1",
        "--cors-origins", ORIGIN,
        "--otlp-traces-endpoint", collector.url,
        env={"DSV2_HIDDEN_MODEL_ALIASES": "gpt-4o-mini"},
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.logs()


def chat(server: Server, key: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **body}
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json=payload,
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )


def test_high_priority_overtakes_a_queue_of_low_priority_requests(server):
    """One sequence at a time: four batch requests (the key's default priority 10) queue up; an interactive one
    (priority 0) sent after them finishes before the last of them."""
    done: dict[str, float] = {}

    def run(name: str, key: str) -> None:
        r = chat(server, key, max_tokens=40, ignore_eos=True)
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    lows = [threading.Thread(target=run, args=(f"low{i}", "sk-b")) for i in range(4)]
    for t in lows:
        t.start()
    wait_for(lambda: metric(server, "vllm:num_requests_waiting") >= 3)
    high = threading.Thread(target=run, args=("high", "sk-i"))
    high.start()
    for t in [*lows, high]:
        t.join(300)
    order = sorted(done, key=done.get)
    assert len(order) == 5
    assert order.index("high") <= 2, order  # ahead of at least two batch requests queued before it


def test_priority_limits_of_a_key(server):
    r = chat(server, "sk-b", priority=0)
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
    assert chat(server, "sk-b", priority=7).status_code == 200
    assert chat(server, "sk-i", priority=-3).status_code == 200


def test_aliases_and_per_key_usage(server):
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-i"}).json()
    assert [m["id"] for m in listed["data"]] == [MODEL, "deepseek-chat"]
    before = metric_exact(server, 'dsv2_key_generation_tokens_total{key="interactive"}')
    for name in ("deepseek-chat", "gpt-4o-mini"):
        r = chat(server, "sk-i", model=name, ignore_eos=True)
        assert r.status_code == 200 and r.json()["model"] == name
    after = metric_exact(server, 'dsv2_key_generation_tokens_total{key="interactive"}')
    assert after - before == 8  # 2 x max_tokens 4
    scrape = httpx.get(f"{server.url}/metrics").text
    assert "sk-i" not in scrape and "sk-b" not in scrape


def test_deadline_aborts_the_engine_request(server):
    started = time.monotonic()
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 480, "ignore_eos": True},
        headers={"Authorization": "Bearer sk-i", "X-Request-Timeout": "1.5"},
        timeout=300,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert time.monotonic() - started < 10
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0)
    assert metric_exact(server, 'dsv2_aborted_requests_total{reason="deadline"}') >= 1


def test_cache_isolation_between_keys(server):
    """Each key's requests carry a cache salt from its name, so a prefix cached for one key is never a hit for
    another. Where vLLM runs prefix caching (GPUs; CPUs with AMX), a repeated long prefix is a hit for the same
    key only. vLLM 0.32 turns prefix caching off for MLA on CPUs without AMX (`MLA is enabled on a non-GPU
    platform; forcing chunked prefill and prefix caching to be disabled`): there, every count is 0."""
    prefix = "You are a careful assistant. " * 40
    body = {"messages": [{"role": "system", "content": prefix}, *HELLO], "max_tokens": 1}
    counts = []
    for key in ("sk-i", "sk-i", "sk-b"):
        usage = chat(server, key, priority=5 if key == "sk-b" else None, **body).json()["usage"]
        counts.append(usage["prompt_tokens_details"]["cached_tokens"])
    info = next(
        line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
        if line.startswith("vllm:cache_config_info{")
    )  # fmt: skip
    caching = re.search(r'enable_prefix_caching="(\w+)"', info)[1] == "True"
    if not caching:
        assert counts == [0, 0, 0]
        pytest.skip(
            "prefix caching is off in this vLLM build for MLA on this CPU; the salt is passed, not observed"
        )
    assert counts[0] == 0 and counts[1] > 0 and counts[2] == 0, counts


def test_key_rate_limit_and_cors_on_the_real_server(server):
    pre = httpx.options(
        f"{server.url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    statuses = []
    for _ in range(3):
        r = chat(server, "sk-m")
        statuses.append(r.status_code)
    assert statuses == [200, 200, 429], statuses
    assert r.headers["x-ratelimit-limit-requests"] == "2" and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert chat(server, "sk-i").status_code == 200  # another key is not limited
    assert metric_exact(server, 'dsv2_key_rate_limited_total{key="metered"}') == 1


def test_traces_reach_an_otlp_collector_with_the_engine_phases(server, collector):
    """The real engine's request stats give queue, prefill and decode spans under the request's span, which
    continues the caller's traceparent and carries the request id."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    headers = {
        "Authorization": "Bearer sk-i",
        "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
        "X-Request-Id": "traced-1",
    }
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200
        r.read()

    def mine():
        return [s for s in collector.spans if s.trace_id.hex() == trace_id]

    wait_for(lambda: len(mine()) >= 6, 30)  # the exporter sends in batches, every few seconds
    spans = {s.name: s for s in mine()}
    assert set(spans) == {"POST /v1/chat/completions", "admission", "template", "queue", "prefill", "decode"}
    root = spans["POST /v1/chat/completions"]
    assert root.parent_span_id.hex() == "b7ad6b7169203331"
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["dsv2.request_id"].string_value == "traced-1"
    assert attributes["dsv2.key"].string_value == "interactive"
    assert attributes["gen_ai.usage.output_tokens"].int_value == 8
    for name in ("queue", "prefill", "decode"):
        span = spans[name]
        assert span.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    assert (
        spans["decode"].end_time_unix_nano > spans["decode"].start_time_unix_nano
    )  # 7 tokens after the first
