"""Start-up you can watch, on the real engine: the server listens at once; while it downloads (from a stand-in for
the hub) and vLLM loads, compiles and warms up, probes and API requests get a prompt 503 with Retry-After and the
phase, /metrics shows the phase and the download's progress; then it serves. A failed start exits non-zero; a
stop during start-up leaves no engine process behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.utils import floatToGoString
from starlette.testclient import TestClient

from server.gateway.app import create_app
from server.gateway.startup import PHASES, PhaseReporter
from server.settings import Settings
from tests import ports
from tests.fake_engine import FakeEngine
from tests.fake_hub import FakeHub

REPO, SHA = "acme/tiny-dsv2", "0123456789abcdef0123456789abcdef01234567"
HUB_BYTES_PER_S = 2e6  # the tiny checkpoint (~9 MB) takes a few seconds: long enough to be watched
POLL_S = 0.1
STARTUP_TIMEOUT_S = 300


def spawn(port: int, model: str, log: Path, env: dict[str, str], *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-model-len", "512", "--enforce-eager", "--gpu-memory-utilization", "0.3", *flags]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)


@dataclass
class Watch:
    """Everything seen while polling a starting server."""

    answers: list[tuple[float, str, int, dict, dict]] = field(
        default_factory=list
    )  # t, path, status, body, hdrs
    refused_after_bound: list[str] = field(default_factory=list)
    worst_s: float = 0.0
    metrics: list[str] = field(default_factory=list)  # each /metrics text

    def phases(self) -> list[str]:
        seen = [b.get("phase") for _, _, status, b, _ in self.answers if status == 503]
        return [p for i, p in enumerate(seen) if i == 0 or p != seen[i - 1]]


def watch_startup(proc: subprocess.Popen, port: int, log: Path) -> Watch:
    """Poll /health, /ready, an API route and /metrics until /ready answers 200."""
    seen = Watch()
    bound = False
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{ports.tail(log)}"
            for path in ("/health", "/ready", "/v1/chat/completions", "/metrics"):
                start = time.monotonic()
                try:
                    if path.startswith("/v1/"):
                        body = {"model": "tiny-dsv2", "messages": [{"role": "user", "content": "hi"}]}
                        r = client.post(path, json=body)
                    else:
                        r = client.get(path)
                except httpx.TransportError as exc:
                    if bound:
                        seen.refused_after_bound.append(f"{path}: {exc!r}")
                    break
                bound = True
                seen.worst_s = max(seen.worst_s, time.monotonic() - start)
                if path == "/metrics":
                    seen.metrics.append(r.text)
                    continue
                seen.answers.append((time.monotonic(), path, r.status_code, r.json(), dict(r.headers)))
                if path == "/ready" and r.status_code == 200:
                    return seen
            time.sleep(POLL_S)
    raise AssertionError(f"not ready after {STARTUP_TIMEOUT_S} s:\n{ports.tail(log)}")


class SlowStartEngine(FakeEngine):
    """A FakeEngine whose start waits for the test, reporting the phases vLLM's processes would."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    async def start(self, startup=None) -> None:
        startup.enter("compiling")
        await asyncio.to_thread(self.go.wait, 30)
        await super().start()


def test_probes_and_api_answer_503_with_the_phase_until_serving(tiny_lite_dir: Path) -> None:
    engine = SlowStartEngine()
    app = create_app(
        Settings(model=str(tiny_lite_dir), served_model_name=["m"]), engine, wait_for_model=False
    )
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while (
            app.state.startup.phase != "compiling" and time.monotonic() < deadline
        ):  # the tokenizer loads first
            time.sleep(0.05)
        for r in (
            c.get("/health"),
            c.get("/ready"),
            c.get("/v1/models"),
            c.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
            ),
        ):
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert r.json()["phase"] == "compiling" and r.json()["error"]["code"] == "starting", r.text
        r = c.post(
            "/v1/messages",
            json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
        )
        assert r.status_code == 503 and r.json()["type"] == "error", r.text  # Anthropic's error shape
        text = c.get("/metrics").text
        assert 'dsv2_startup_phase{phase="compiling"} 1.0' in text
        assert 'dsv2_startup_phase{phase="serving"} 0.0' in text
        engine.go.set()
        deadline = time.monotonic() + 10
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/health").json() == {"status": "ok"}
        r = c.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 200, r.text
        assert 'dsv2_startup_phase{phase="serving"} 1.0' in c.get("/metrics").text


def test_a_failed_start_stops_the_server(tiny_lite_dir: Path) -> None:
    class Broken(FakeEngine):
        async def start(self, startup=None) -> None:
            raise RuntimeError("no memory for the KV cache")

    stopped = threading.Event()
    app = create_app(Settings(model=str(tiny_lite_dir)), Broken(), wait_for_model=False)
    app.state.stop_server = stopped.set
    with TestClient(app):
        assert stopped.wait(10)
        assert app.state.startup.error == "RuntimeError: no memory for the KV cache"


def test_phase_reporter_follows_vllm_log_lines(tmp_path: Path) -> None:
    status = tmp_path / "status"
    first, second = PhaseReporter(str(status)), PhaseReporter(str(status))  # two processes (TP ranks)

    def say(reporter: PhaseReporter, message: str, *args: object) -> str | None:
        reporter.emit(logging.LogRecord("vllm.x", logging.INFO, __file__, 1, message, args, None))
        return json.loads(status.read_text())["phase"] if status.exists() else None

    assert say(first, "Automatically detected platform cpu.") is None
    assert say(first, "Starting to load model %s...", "/m") == "loading_weights"
    assert say(first, "Loading weights took 0.21 seconds") == "compiling"
    assert say(second, "Starting to load model /m...") == "compiling"  # a later rank never moves it back
    assert say(first, "Rank 0: Torch profiler disabled for CUDA graph capture") == "capturing_graphs"
    assert say(first, "Model loading took 1 GiB memory and 2 seconds") == "capturing_graphs"


@pytest.fixture(scope="module")
def checkpoint(tiny_lite_dir: Path) -> Path:
    return tiny_lite_dir


@pytest.mark.engine
def test_downloads_and_starts_behind_503s_that_name_the_phase(checkpoint: Path, tmp_path: Path) -> None:
    log, downloads = tmp_path / "server.log", tmp_path / "models"
    with FakeHub(REPO, SHA, checkpoint, HUB_BYTES_PER_S) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        port = ports.free_port()
        proc = spawn(port, REPO, log, env, "--revision", SHA, "--download-dir", str(downloads))
        try:
            seen = watch_startup(proc, port, log)
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "tiny-dsv2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny-dsv2"
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        assert code == 0, ports.tail(log)

    # Listening from the first answer on: never refused, never slow.
    assert seen.refused_after_bound == []
    assert seen.worst_s < 1.0, seen.worst_s
    starting = [a for a in seen.answers if a[2] != 200]
    assert len(starting) > 10
    for _, path, status, body, headers in starting:
        assert status == 503, (path, status, body)
        assert headers.get("retry-after") == "5", (path, headers)
        assert body["error"]["code"] == "starting" and body["phase"] in PHASES[:-1], body
        assert body["error"]["message"].startswith("the model is starting: "), body
    # Phases in order, each one the server went through seen at least once (CPU: no CUDA graphs).
    phases = seen.phases()
    assert phases == sorted(phases, key=PHASES.index), phases
    assert {"downloading", "loading_weights", "compiling"} <= set(phases), phases
    # The download's progress on the probes and /metrics.
    progress = [b["progress"] for _, _, _, b, _ in starting if b["phase"] == "downloading"]
    assert any(0 < p < 1 for p in progress if p is not None), progress
    known = [p for p in progress if p is not None]  # None until the hub has listed the files
    assert known == sorted(known), progress
    size = sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())
    downloading = [t for t in seen.metrics if 'dsv2_startup_phase{phase="downloading"} 1.0' in t]
    assert any(f"dsv2_startup_download_size_bytes {floatToGoString(size)}" in t for t in downloading)
    assert any('dsv2_startup_phase{phase="compiling"} 1.0' in t for t in seen.metrics)
    # The weights landed in DIR/<repo>/<revision>, fetched from the hub's resolve URLs.
    assert (downloads / REPO / SHA / "model.safetensors").stat().st_size > 0
    assert any(r.startswith(f"GET /{REPO}/resolve/{SHA}/model.safetensors") for r in hub.requests)
    logged = log.read_text()
    for phase in ("downloading", "loading_weights", "compiling", "serving"):
        assert f"start-up: {phase}" in logged


@pytest.mark.engine
def test_a_failed_start_exits_non_zero_with_its_reason(checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with FakeHub(REPO, SHA, checkpoint, HUB_BYTES_PER_S) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        proc = spawn(ports.free_port(), "acme/no-such-model", log, env, "--revision", SHA)
        assert proc.wait(120) == 1, ports.tail(log)
    assert "start-up failed in phase downloading" in log.read_text(), ports.tail(log)


@pytest.mark.engine
def test_a_stop_during_start_up_leaves_no_engine_behind(checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    port = ports.free_port()
    proc = spawn(port, str(checkpoint), log, {})
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not children:  # until vLLM has started its engine process
            assert proc.poll() is None, ports.tail(log)
            children = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
            time.sleep(0.2)
        assert children, ports.tail(log)
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, ports.tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in children):
        time.sleep(0.2)
    left = [
        p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert left == [], ports.tail(log)


def test_a_complete_pinned_download_is_reused_without_the_hub(tiny_lite_dir: Path, tmp_path: Path) -> None:
    """A restart with no egress (or HF_HUB_OFFLINE=1) serves the pinned revision already on the volume."""
    script = (
        "import sys; from server.gateway.startup import Startup, download;"
        "from server.gateway.metrics import GatewayMetrics;"
        "print(download(sys.argv[1], sys.argv[2], sys.argv[3], Startup(GatewayMetrics(), 'downloading')))"
    )
    models = tmp_path / "models"

    def fetch(env: dict[str, str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
        cmd = [sys.executable, "-c", script, REPO, SHA, str(models)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    with FakeHub(REPO, SHA, tiny_lite_dir, 50e6) as hub:
        first = fetch({"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    assert first.returncode == 0, first.stderr
    assert (models / REPO / SHA / "model.safetensors").is_file()
    for env in (
        {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"},
        {"HF_HUB_OFFLINE": "1"},
    ):  # hub down; offline
        again = fetch(env)
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
