"""Several gateway processes in front of one engine core (`--api-server-count 2`), on the real vLLM engine: load
spread over both, one admission budget, one /metrics with every process's series, a drain of every process on
SIGTERM, and a killed process taking the pod down (the parent notices, the probes fail) instead of serving on
half-broken, and a key's requests per minute counted once for both through a real Redis (--rate-limit-store;
the store's own tests, across separate gateways, are in tests/test_rate_limit_store.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.test_gateway_engine import MODEL, Server, start_server
from tests.test_rate_limit_store import RedisServer

pytestmark = pytest.mark.engine

BUDGET = 3
KEYS = """
open: sk-open
three:
  key: sk-three
  requests_per_minute: 3
"""
AUTH = {"Authorization": "Bearer sk-open"}


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer):
    work = tmp_path_factory.mktemp("api-servers")
    (work / "keys.yaml").write_text(KEYS)
    srv = start_server(
        tiny_lite_dir,
        work / "server.log",
        "--api-server-count", "2",
        "--max-inflight-sequences", str(BUDGET),
        "--api-key-file", str(work / "keys.yaml"),
        "--rate-limit-store", redis_server.url,
    )  # fmt: skip
    yield srv
    srv.stop()


def served_by(server: Server, method: str, path: str, status: int) -> list[str]:
    """The processes (api-server-<i>) whose access log shows `method path` answered `status`, in order."""
    pattern = re.compile(rf'"{method} {re.escape(path)}" {status} .* server=(api-server-\d)')
    return [m.group(1) for m in pattern.finditer(server.log.read_text(errors="replace"))]


def metric(server: Server, name: str) -> float:
    """A metric's value on /metrics, summed over its series (whichever process answers)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not on /metrics"
    return sum(values)


def long_stream(server: Server, results: list, tokens: int = 300) -> None:
    """A streamed completion of `tokens` tokens on a connection of its own; appends (status, finish_reason)."""
    body = {"model": MODEL, "prompt": "Once", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    finish = None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=180) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"finish_reason":"' in line:
                finish = re.search(r'"finish_reason":"(\w+)"', line).group(1)
        results.append((r.status_code, finish))


def wait_for(condition, timeout: float = 60, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def test_streams_spread_over_both_processes(server: Server) -> None:
    def chat(i: int, out: list) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 24}
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={**body, "stream": True},
            headers=AUTH,
            timeout=120,
        ) as r:
            out.append((r.status_code, [line for line in r.iter_lines() if line]))

    out: list = []
    threads = [threading.Thread(target=chat, args=(i, out)) for i in range(BUDGET)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in out] == [200] * BUDGET
    assert all(lines[-1] == "data: [DONE]" for _, lines in out)
    time.sleep(0.5)  # access lines are written as the responses end
    assert set(served_by(server, "POST", "/v1/chat/completions", 200)) == {"api-server-0", "api-server-1"}


def test_one_budget_for_every_process(server: Server) -> None:
    """The budget is the engine's: with BUDGET streams held across both processes, every further request is
    refused, whichever process takes it (per-process budgets would admit up to twice as many)."""
    results: list = []
    threads = [threading.Thread(target=long_stream, args=(server, results)) for _ in range(BUDGET)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(server, "dsv2_sequences_in_flight") == BUDGET)  # summed over the processes
    refused = []
    for _ in range(4):  # fresh connections: the least-loaded process accepts each
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 2},
            headers=AUTH,
        )
        refused.append((r.status_code, r.json()["error"]["message"]))
    for t in threads:
        t.join()
    assert results == [(200, "length")] * BUDGET
    assert all(
        status == 429 and f"{BUDGET} of {BUDGET} sequences in flight" in msg for status, msg in refused
    )
    time.sleep(0.5)
    # The held streams were on both processes, so each one refused with room left of its own.
    assert set(served_by(server, "POST", "/v1/completions", 200)[-BUDGET:]) == {
        "api-server-0",
        "api-server-1",
    }
    assert metric(server, "dsv2_sequences_in_flight") == 0


def test_metrics_sum_every_process(server: Server) -> None:
    route = 'dsv2_http_requests_total{method="POST",route="/v1/completions",status="200"}'
    before = metric(server, route)
    before_tokens = metric(server, "vllm:generation_tokens_total")
    for _ in range(6):  # each on a new connection, so both processes take some
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
            headers=AUTH,
        )
        assert r.status_code == 200
    served = served_by(server, "POST", "/v1/completions", 200)[-6:]
    assert set(served) == {"api-server-0", "api-server-1"}
    for _ in range(4):  # the same sums from whichever process answers the scrape
        assert metric(server, route) == before + 6
        assert metric(server, "vllm:generation_tokens_total") >= before_tokens + 18
    assert metric(server, "dsv2_inflight_sequences_limit") == BUDGET
    assert metric(server, 'dsv2_startup_phase{phase="serving"}') == 1
    # Each process's CPU and memory, named as its logs name it: they served requests, so their CPU is not 0.
    for name in ("api-server-0", "api-server-1"):
        assert metric(server, f'process_cpu_seconds_total{{server="{name}"}}') > 0
        assert metric(server, f'process_resident_memory_bytes{{server="{name}"}}') > 100e6
    assert metric(server, "process_cpu_seconds_total") == pytest.approx(
        sum(metric(server, f'process_cpu_seconds_total{{server="api-server-{i}"}}') for i in (0, 1)), rel=0.2
    )


def test_front_processes_are_the_parent_s_titled_children() -> None:
    """FrontProcesses finds the processes by their title under their parent, whatever else runs beside them, and
    exports prometheus-client's process metrics of each with its `server` label."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.gateway.metrics import FrontProcesses

    def child(title: str) -> subprocess.Popen:
        code = f"import setproctitle, time; setproctitle.setproctitle({title!r}); time.sleep(60)"
        return subprocess.Popen([sys.executable, "-c", code])

    children = [child("VLLM::APIServer_1"), child("VLLM::EngineCore_DP0"), child("VLLM::APIServer_0")]
    try:
        registry = CollectorRegistry()
        registry.register(FrontProcesses(parent=os.getpid()))
        deadline = time.monotonic() + 20
        while True:  # until the children have set their titles
            families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
            cpu = families.get("process_cpu_seconds")
            servers = {s.labels["server"] for s in cpu.samples} if cpu else set()
            if servers == {"api-server-0", "api-server-1"} or time.monotonic() > deadline:
                break
            registry = CollectorRegistry()
            registry.register(FrontProcesses(parent=os.getpid()))
            time.sleep(0.2)
        assert servers == {"api-server-0", "api-server-1"}  # not the engine core
        assert cpu.type == "counter"
        memory = {s.labels["server"]: s.value for s in families["process_resident_memory_bytes"].samples}
        assert all(v > 1e6 for v in memory.values()) and len(memory) == 2
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_a_key_s_requests_per_minute_hold_across_processes(server: Server) -> None:
    """A key allowed 3 requests a minute, 8 requests at once on fresh connections (both processes take some):
    exactly three are served, counted once in the shared store, not three per process."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

    def post(_: int) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/completions",
            json=body,
            headers={"Authorization": "Bearer sk-three"},
            timeout=60,
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 5
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in answers if r.status_code == 200) == [
        "0",
        "1",
        "2",
    ]
    time.sleep(0.5)
    lines = re.findall(r' three "POST /v1/completions" \d+ .* server=(api-server-\d)', server.log.read_text())
    assert len(lines) == 8 and set(lines) == {"api-server-0", "api-server-1"}


def test_runtime_lora_loading_is_refused(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--model", str(tmp_path), "--api-server-count", "2",
         "--allow-runtime-lora-updating"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--allow-runtime-lora-updating cannot be used with --api-server-count 2" in r.stderr


def test_sigterm_drains_every_process(server: Server) -> None:
    """Runs last in the module: it stops the module's server."""
    results: list = []
    threads = [threading.Thread(target=long_stream, args=(server, results, 200)) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: metric(server, "dsv2_sequences_in_flight") == 2)
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert len([c for c in children if "APIServer" in " ".join(c.cmdline())]) == 2
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert results == [(200, "length")] * 2  # both finished, one on each process
    assert server.proc.wait(60) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.name() for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_a_killed_process_takes_the_pod_down(tiny_lite_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_lite_dir, tmp_path / "server.log", "--api-server-count", "2")
    try:
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        victim = next(c for c in children if "APIServer_1" in " ".join(c.cmdline()))
        victim.kill()
        assert srv.proc.wait(60) == 1  # the parent noticed, stopped the rest and failed
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.name() for p in alive]
        with pytest.raises(httpx.ConnectError):  # liveness fails: nothing answers for the pod
            httpx.get(f"{srv.url}/health", timeout=5)
        assert re.search(r"stopping: Process ApiServer_1 .* died", srv.log.read_text(errors="replace"))
    finally:
        srv.crash() if srv.proc.poll() is None else None
