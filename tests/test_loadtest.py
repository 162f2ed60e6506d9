"""A short locust run (loadtests/locustfile.py) against `python -m server serve` on the tiny checkpoint.

One server for the module; locust runs headless as a subprocess and is judged by its CSV stats, its summary JSON
and its exit code (the SLO listener owns it).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
STARTUP_TIMEOUT_S = float(os.environ.get("DSV2_TEST_STARTUP_TIMEOUT", "600"))
METRIC_TYPES = {"TTFT", "ITL", "TOK/S"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("loadtest-server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--model",
        str(tiny_lite_dir),
        "--served-model-name",
        "tiny-dsv2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/ready", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_locust(
    url: str, out: Path, *args: str, users: int = 3, run_time: int = 15
) -> subprocess.CompletedProcess:
    """Headless locust with reports under `out`; extra args (flags, then user classes) at the end."""
    # A developer's own target/SLO/model settings must not leak into the test.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADTEST_", "LOCUST_", "DSV2_"))}
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--host",
        url,
        "--headless",
        "--only-summary",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{run_time}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(out / "run"),
        "--max-tokens",
        "32",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=run_time + 180)


def read_stats(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "run_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_short_run_has_no_failures_and_records_ttft(server_url: str, tmp_path: Path) -> None:
    proc = run_locust(server_url, tmp_path, "--html", str(tmp_path / "report.html"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    stats = read_stats(tmp_path)
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, output[-6000:]
    http = {key: row for key, row in stats.items() if key[0] not in METRIC_TYPES and key[1] != "Aggregated"}
    assert {name for _, name in http} >= {"models", "chat-stream", "chat"}, sorted(stats)
    assert all(int(row["Failure Count"]) == 0 for row in http.values())
    # Aggregated counts each HTTP request once; TTFT/ITL/TOK/S samples stay out of it.
    assert int(total["Request Count"]) == sum(int(row["Request Count"]) for row in http.values())

    ttft = stats[("TTFT", "chat-stream")]
    assert int(ttft["Request Count"]) > 0
    ttft_ms, stream_ms = (
        float(ttft["Average Response Time"]),
        float(stats[("POST", "chat-stream")]["Average Response Time"]),
    )
    # Streams are timed to the last byte, so the request takes at least as long as its first token.
    assert 0 < ttft_ms <= stream_ms < 120_000, (ttft_ms, stream_ms)
    assert int(stats[("ITL", "chat-stream")]["Request Count"]) > 0
    assert float(stats[("TOK/S", "chat-stream")]["Average Content Size"]) > 0  # completion tokens per request

    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["passed"] and summary["failures"] == 0
    assert summary["ttft_ms"]["count"] > 0 and 0 < summary["ttft_ms"]["p95"] < 120_000
    assert summary["output_tokens"] > 0 and summary["output_tokens_per_s"] > 0
    assert "TTFT" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_impossible_slo_fails_the_run(server_url: str, tmp_path: Path) -> None:
    proc = run_locust(
        server_url, tmp_path, "--slo-ttft-p95-ms", "0.001", "ChatStreamUser", users=1, run_time=8
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-6000:]
    assert "SLO TTFT p95" in output and "SLO verdict: FAIL" in output, output[-6000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert not summary["passed"] and summary["failures"] == 0  # the requests themselves were fine
    assert [s["slo"] for s in summary["slos"] if not s["ok"]] == ["TTFT p95"]
