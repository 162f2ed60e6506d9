"""Short locust runs (loadtests/) against `python -m server serve` on the tiny checkpoint.

One server for the module; locust runs headless as a subprocess (directly, or through loadtests/run.sh with
DSV2_TARGET as other checks call it) and is judged by its CSV stats, its summary JSON, a sweep's sweep.json
and plots, and its exit code. The sweep's arithmetic is also checked on hand-made records, without a server.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_gateway_engine import start_server

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
STARTUP_TIMEOUT_S = float(os.environ.get("DSV2_TEST_STARTUP_TIMEOUT", "600"))
METRIC_TYPES = {"TTFT", "TPOT", "ITL", "TOK/S"}
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def server_url(tiny_lite_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("loadtest-server") / "server.log"
    server = start_server(tiny_lite_dir, log, max_model_len=MAX_MODEL_LEN)
    try:
        yield server.url
    finally:
        server.stop()


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
    return read_stats_file(out / "run_stats.csv")


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


# ---------------------------------------------------------------------------------------------- open loop


def run_sh(url: str, out: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """loadtests/run.sh against the running server, with only the LOADTEST_* knobs given here."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOADTEST_", "LOCUST_", "DSV2_"))}
    env = {**clean, "DSV2_TARGET": url, "LOADTEST_REPORT_DIR": str(out), "PY": sys.executable, **env}
    return subprocess.run(
        ["bash", "loadtests/run.sh"], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def test_rate_sweep_writes_sweep_json_plots_and_report(server_url: str, tmp_path: Path) -> None:
    rates, run_time, input_len, output_len = (2.0, 4.0), 4, 24, 8
    proc = run_sh(
        server_url,
        tmp_path,
        LOADTEST_RATES=",".join(f"{r:g}" for r in rates),
        LOADTEST_RUN_TIME=f"{run_time}s",
        LOADTEST_INPUT_LEN=str(input_len),
        LOADTEST_OUTPUT_LEN=str(output_len),
        LOADTEST_GOODPUT_E2E_MS="60000",
        LOADTEST_GOODPUT_TTFT_MS="0.001",  # no request meets it: goodput 0 with no failure
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    rows = json.loads((tmp_path / "sweep.json").read_text())
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [row["rate"] for row in rows] == list(rates), rows
    for row in rows:
        # Open loop: all rate x run time arrivals were sent, whatever the server's latency.
        assert row["requests"] == row["rate"] * run_time, row
        assert row["failures"] == 0, output[-6000:]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            p = row[key]
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"] < 120_000, (key, p)
        assert 0 < row["ttft_ms"]["p50"] < row["e2e_ms"]["p50"], row
        assert row["tpot_ms"]["p50"] > 0
        # Exact lengths, as the server counted them (usage), over the rate's duration.
        done = row["requests"] - row["failures"]
        assert row["input_tokens"] == input_len * done and row["output_tokens"] == output_len * done, row
        # sweep.json rounds rates and durations to 3 decimals: 1% covers that at any rate this test runs.
        assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["duration_s"], rel=0.01)
        assert row["input_tok_s"] == pytest.approx(input_len * row["output_tok_s"] / output_len, rel=0.01)
        sent = [r for r in requests if r["rate"] == row["rate"]]
        assert len(sent) == row["requests"] and all(0 <= r["sent_s"] <= run_time + 1 for r in sent)
        # sent_s is rounded to 4 decimals, e2e_ms and duration_s to 3: 0.01 s is well above their sum
        assert max(r["sent_s"] + r["e2e_ms"] / 1000 for r in sent) == pytest.approx(
            row["duration_s"], abs=0.01
        )
        # exact: 0 good of n is 0.0, and the SLOs are the flag's decimals parsed back
        assert row["goodput"] == 0.0 and row["slos_ms"] == {"ttft_ms": 0.001, "e2e_ms": 60000.0}

    assert len(requests) == sum(row["requests"] for row in rows)
    for name in ("throughput.png", "ttft.png", "tpot.png", "latency_hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}"' in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert (tmp_path / "locust.html").exists()  # locust's own report, beside ours
    assert "rate sweep (poisson)" in output


def test_prompt_longer_than_the_context_stops_the_run(server_url: str, tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_sh(
        server_url,
        tmp_path,
        timeout=120,
        LOADTEST_RATES="2",
        LOADTEST_RUN_TIME="30s",
        LOADTEST_INPUT_LEN=str(MAX_MODEL_LEN),
        LOADTEST_OUTPUT_LEN="16",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-6000:]
    assert (
        f"input length {MAX_MODEL_LEN} + output length 16 = {MAX_MODEL_LEN + 16} tokens does not fit the "
        f"server's context of {MAX_MODEL_LEN} tokens"
    ) in output, output[-6000:]
    assert time.monotonic() - start < 30  # at once, not after the 30 s rate
    assert not (tmp_path / "sweep.json").exists()


def test_sharegpt_dataset_leaves_out_what_does_not_fit(
    server_url: str, tiny_lite_dir: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "sharegpt.json"
    long_prompt = "tokens " * (2 * MAX_MODEL_LEN)
    dataset.write_text(
        json.dumps(
            [
                {
                    "id": "fits",
                    "conversations": [
                        {"from": "human", "value": "Hello there!"},
                        {"from": "gpt", "value": "Hi."},
                    ],
                },
                {
                    "id": "too-long",
                    "conversations": [
                        {"from": "human", "value": long_prompt},
                        {"from": "gpt", "value": "No."},
                    ],
                },
                {"id": "no-reply", "conversations": [{"from": "human", "value": "Alone."}]},
            ]
        )
    )
    proc = run_sh(
        server_url,
        tmp_path,
        LOADTEST_DATASET=str(dataset),
        LOADTEST_OUTPUT_LEN="4",
        LOADTEST_TOKENIZER=str(tiny_lite_dir),
        LOADTEST_USERS="2",
        LOADTEST_RUN_TIME="4s",
        LOADTEST_THINK_TIME="0,0.1",
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "left out 1 prompt(s)" in output and "too-long:" in output, output[-6000:]
    stats = read_stats_file(tmp_path / "loadtest_stats.csv")
    post = stats[("POST", "completion-stream")]  # the closed-loop workload user, nothing else
    assert int(post["Request Count"]) > 0 and int(post["Failure Count"]) == 0, output[-6000:]
    assert float(stats[("TOK/S", "completion-stream")]["Average Content Size"]) == 4  # ignore_eos, exactly 4
    assert {name for (kind, name) in stats if kind == "POST"} == {"completion-stream"}


def read_stats_file(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------- sweep arithmetic


@pytest.fixture(scope="module")
def sweeps():
    sys.path.insert(0, str(REPO / "loadtests"))
    try:
        import sweep

        yield sweep
    finally:
        sys.path.remove(str(REPO / "loadtests"))


def test_summary_follows_vllm_definitions(sweeps) -> None:
    import numpy as np

    phase = sweeps.Phase(rate=4.0, start=100.0)
    ttfts = [50.0, 80.0, 120.0, 400.0]
    for i, ttft in enumerate(ttfts):
        first, last = 100 + i + ttft / 1000, 100 + i + ttft / 1000 + 0.09  # 10 tokens, 9 gaps of 10 ms
        tpot = sweeps.tpot_ms(first, last, 10)
        phase.records.append(
            sweeps.Record(
                True, 100.0 + i, last + 0.001, ttft, tpot, [10.0] * 9, prompt_tokens=32, output_tokens=10
            )
        )
    phase.records.append(sweeps.Record(False, 103.0, 103.2))  # failed before the last success ended
    phase.sent = 5
    slo = sweeps.Goodput(ttft_ms=100.0)
    row = sweeps.summarize(phase, "poisson", slo)

    assert row["requests"] == 5 and row["failures"] == 1
    # summarize rounds times and rates to 3 decimals and goodput to 4: those are the tolerances below
    for q in (50, 90, 99):
        assert row["ttft_ms"][f"p{q}"] == pytest.approx(np.percentile(ttfts, q), abs=1e-3)
    assert row["tpot_ms"]["p50"] == pytest.approx(10.0, abs=1e-3)
    # exact: percentiles and mean of identical 10.0 gaps, rounded to 3 decimals
    assert row["itl_ms"] == {"p50": 10.0, "p90": 10.0, "p99": 10.0, "mean": 10.0}
    duration = 103 + 0.4 + 0.09 + 0.001 - 100  # first arrival to the last completion
    assert row["duration_s"] == pytest.approx(duration, abs=1e-3)
    assert row["output_tok_s"] == pytest.approx(40 / duration, rel=1e-3)
    assert row["input_tok_s"] == pytest.approx(128 / duration, rel=1e-3)
    # 50 and 80 ms of 5 sent; the failure is never good
    assert row["goodput"] == pytest.approx(2 / 5, abs=5e-5)


def test_sweep_sends_each_rate_then_drains(sweeps) -> None:
    # Rates, starts and the last arrival are the floats passed in (the run time is appended as it is): exact.
    sweep = sweeps.Sweep([2.0, 8.0], run_time=10.0, arrival="poisson", drain_timeout=30.0, seed=1)
    assert sweep.advance(0.0) and sweep.current.rate == 2.0
    phase = sweep.current
    assert len(phase.arrivals) == 20 and phase.arrivals == sorted(phase.arrivals)
    assert 0 <= phase.arrivals[0] and phase.arrivals[-2] <= phase.arrivals[-1] == 10.0
    phase.sent = 19  # one arrival left: the rate goes on, however late
    assert sweep.advance(50.0) and sweep.current is phase and phase.due() == phase.arrivals[-1]
    phase.sent = 20
    phase.records += [sweeps.Record(True, 1.0, 12.0)] * 17  # three still running: no new rate yet
    assert sweep.advance(12.0) and sweep.current is phase
    phase.records += [sweeps.Record(True, 2.0, 13.0)] * 3
    assert sweep.advance(14.0) and sweep.current.rate == 8.0 and sweep.current.start == 14.0
    sweep.current.sent = len(sweep.current.arrivals)  # all sent, none ends: drain gives up after 30 s
    assert sweep.advance(14.0 + 10.0 + 29.0) and sweep.current.rate == 8.0
    assert not sweep.advance(14.0 + 10.0 + 30.0)

    # Poisson, conditioned on the last arrival: gaps between sorted uniform times are close to exponential.
    times = sweeps.Sweep([50.0], run_time=400.0, arrival="poisson", drain_timeout=1.0, seed=2).arrivals(50.0)
    gaps = [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    assert len(times) == 20_000
    # statistical bounds for 20,000 gaps: the mean's standard error is 0.7%, the sd's about 1%
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.02)
    assert statistics.pstdev(gaps) == pytest.approx(1 / 50, rel=0.05)  # exponential: sd = mean
    constant = sweeps.Sweep([4.0], run_time=1.0, arrival="constant", drain_timeout=1.0).arrivals(4.0)
    assert constant == [0.25, 0.5, 0.75, 1.0]  # i / 4: exact binary fractions
