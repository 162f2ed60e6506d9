"""Locust load test for the OpenAI API of dsv2-serve (or any OpenAI-compatible server).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 2 -t 60s \
        --csv reports/loadtest/run --html reports/loadtest/report.html --slo-ttft-p95-ms 2000

Users (weights 3:1:1): streaming chat, non-streaming chat, completions (half streamed, half not). Each request
takes a random prompt from loadtests/prompts.jsonl (short and long, English and Chinese, each with its own
max_tokens). Target, model and key: --host / DSV2_TARGET, --model / LOADTEST_MODEL / DSV2_SERVED_MODEL_NAME
(else the first id of GET /v1/models), --api-key / DSV2_API_KEY / OPENAI_API_KEY. docs/loadtesting.md lists
every flag (locust's --help does not: it prints before it loads the locustfile).

Rows in the console, CSV and HTML reports:
  POST  <scenario>  one row per HTTP request. Streams are timed by hand to the last byte (locust alone stops
                    the clock at the response headers), so "response time" is the end-to-end latency.
  TTFT  <scenario>  time to the first non-empty content chunk, ms (streaming scenarios only).
  ITL   <scenario>  gap between consecutive content chunks, ms (one sample per gap).
  TOK/S <scenario>  output tokens/s of one request: completion tokens / end-to-end time. Its "average size"
                    column is the mean completion tokens per request.
The TTFT/ITL/TOK/S rows are measurements, not requests: they are fired through `events.request` so that they
land in every report, but they are kept out of the "Aggregated" row, which therefore counts HTTP requests
(and their failures) only. They are only fired for successful requests.

SLOs (flags or LOADTEST_SLO_* variables) are checked when locust quits and decide the exit code: 0 when every
SLO holds, 1 when one is missed. The error-rate SLO defaults to 0, so any failed request fails the run as in
plain locust; a `quitting` listener that sets the exit code takes precedence over --exit-code-on-error, which
then only applies when the locustfile itself raised. The aggregate output tokens/s SLO is total completion
tokens / (last request - start of the stats).

LOADTEST_SHAPE=step or ramp picks a load shape that reads -u/-r/-t (see StepShape, RampShape).

Open loop and workloads (environment, read when locust loads this file, since they pick the user classes):
  LOADTEST_RATES=2,4,8       an open-loop sweep: ArrivalUser fires streamed completions at Poisson (or, with
                             LOADTEST_ARRIVAL=constant, evenly spaced) arrival times, each rate for
                             LOADTEST_RUN_TIME (30s), draining between rates (SweepShape, loadtests/sweep.py);
                             writes sweep.json, requests.jsonl, PNG plots and report.html (loadtests/report.py)
                             into --report-dir. -u and -t do not apply.
  LOADTEST_INPUT_LEN / LOADTEST_OUTPUT_LEN   random-token prompts of exact lengths (ignore_eos);
  LOADTEST_DATASET=file.json                 a ShareGPT file (loadtests/workloads.py).
With a workload and no rates, WorkloadUser (-u users, closed loop) streams it instead of the three users below.
Prompts are checked against the server's max_model_len (GET /v1/models) before the run starts.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent.lock
import gevent.pool
import report
import requests
import sweep as sweeps
import workloads
from locust import HttpUser, LoadTestShape, User, events, task
from locust import log as locust_log
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import STATE_RUNNING, STATE_SPAWNING, LocalRunner, WorkerRunner
from locust.stats import RequestStats, StatsEntry, calculate_response_time_percentile
from locust.util.timespan import parse_timespan
from urllib3 import PoolManager
from workloads import Request, WorkloadError

DEFAULT_TARGET = "http://127.0.0.1:8000"
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")
# request_type of the per-token measurements; kept out of the Aggregated row.
METRIC_TYPES = frozenset({"TTFT", "TPOT", "ITL", "TOK/S"})
SLO_FAILED_EXIT_CODE = 1
_REPORT: list[str] = []  # the summary lines, kept from `quitting` until `quit`


# ---------------------------------------------------------------------------------------------- options


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    # On the parser itself, not a group: only LocustArgumentParser.add_argument knows is_secret.
    parser.add_argument(
        "--model",
        env_var="LOADTEST_MODEL",
        default="",
        help="Model name to send; default: DSV2_SERVED_MODEL_NAME, else the first id of GET /v1/models.",
    )
    parser.add_argument(
        "--api-key",
        env_var="DSV2_API_KEY",
        default="",
        is_secret=True,
        help="Bearer token (DSV2_API_KEY, else OPENAI_API_KEY); empty = no Authorization header.",
    )
    parser.add_argument(
        "--prompts",
        env_var="LOADTEST_PROMPTS",
        default=str(DEFAULT_PROMPTS),
        help="JSONL prompt mix: {id, lang, length, prompt, max_tokens, system?} per line.",
    )
    parser.add_argument(
        "--max-tokens",
        env_var="LOADTEST_MAX_TOKENS",
        type=int,
        default=0,
        help="Cap every prompt's max_tokens at this value; 0 = use the prompt file's values.",
    )
    parser.add_argument(
        "--request-timeout",
        env_var="LOADTEST_REQUEST_TIMEOUT",
        type=float,
        default=120.0,
        help="Seconds to wait for a response (and between two stream chunks).",
    )
    parser.add_argument(
        "--think-time",
        env_var="LOADTEST_THINK_TIME",
        default="0.2,1.0",
        help="MIN,MAX seconds a user waits between requests; 0,0 = back to back.",
    )
    parser.add_argument(
        "--steps",
        env_var="LOADTEST_STEPS",
        type=int,
        default=4,
        help="LOADTEST_SHAPE=step only: number of equal steps up to --users.",
    )
    parser.add_argument(
        "--tokenizer",
        env_var="LOADTEST_TOKENIZER",
        default="",
        help="The served model's tokenizer (directory or hub id): counts prompts against the context, draws "
        "random tokens from its vocabulary. Empty = text prompts go unchecked, random ids from 100..999.",
    )
    parser.add_argument(
        "--arrival",
        env_var="LOADTEST_ARRIVAL",
        default="poisson",
        choices=sweeps.ARRIVALS,
        help="LOADTEST_RATES only: arrival process, poisson (exponential gaps) or constant (even gaps).",
    )
    parser.add_argument(
        "--seed",
        env_var="LOADTEST_SEED",
        type=int,
        default=0,
        help="Seed of the random prompts and arrival times.",
    )
    for slo in ("ttft", "tpot", "e2e"):
        parser.add_argument(
            f"--goodput-{slo}-ms",
            env_var=f"LOADTEST_GOODPUT_{slo.upper()}_MS",
            type=float,
            default=None,
            help=f"Goodput: a request counts as good only when its {slo.upper()} is at most this (ms).",
        )
    parser.add_argument(
        "--report-dir",
        env_var="LOADTEST_REPORT_DIR",
        default="",
        help="Where a sweep writes sweep.json, requests.jsonl, its plots and report.html; default: the folder "
        "of --csv, else reports/loadtest.",
    )
    parser.add_argument(
        "--slo-ttft-p95-ms",
        env_var="LOADTEST_SLO_TTFT_P95_MS",
        type=float,
        default=None,
        help="Fail the run when the p95 time to first token (all streaming scenarios) is above this.",
    )
    parser.add_argument(
        "--slo-itl-p95-ms",
        env_var="LOADTEST_SLO_ITL_P95_MS",
        type=float,
        default=None,
        help="Fail the run when the p95 inter-token latency is above this.",
    )
    parser.add_argument(
        "--slo-max-error-rate",
        env_var="LOADTEST_SLO_MAX_ERROR_RATE",
        type=float,
        default=0.0,
        help="Fail the run when failed/all HTTP requests is above this fraction (0.01 = 1%%).",
    )
    parser.add_argument(
        "--slo-min-tokens-per-s",
        env_var="LOADTEST_SLO_MIN_TOKENS_PER_S",
        type=float,
        default=None,
        help="Fail the run when the aggregate output tokens/s of the whole run is below this.",
    )


def _options(environment: Environment) -> Any:
    opts = environment.parsed_options
    if opts is None:  # used as a library without locust's parser: take the defaults
        from locust.argument_parser import get_parser

        opts = get_parser().parse_args([])
    return opts


def _think_time(spec: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--think-time must be MIN,MAX seconds, got {spec!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"--think-time needs 0 <= MIN <= MAX, got {spec!r}")
    return low, high


# ---------------------------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = json.loads(line)
            if not isinstance(p.get("prompt"), str) or not isinstance(p.get("max_tokens"), int):
                raise ValueError(f"{path}:{n}: every prompt needs a string 'prompt' and an int 'max_tokens'")
            prompts.append(p)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------- metrics


def keep_metrics_out_of_totals(stats: RequestStats) -> None:
    """Log TTFT/ITL/TOK/S samples to their own rows only, so Aggregated stays a count of HTTP requests."""
    log_request = stats.log_request

    def log(method: str, name: str, response_time: float, content_length: int) -> None:
        if method in METRIC_TYPES:
            stats.entries[(name, method)].log(response_time, content_length)
        else:
            log_request(method, name, response_time, content_length)

    stats.log_request = log  # type: ignore[method-assign]


# Read when locust loads this file, since they pick the user classes (bottom of the file), as LOADTEST_SHAPE
# picks the shape: an open-loop sweep, and a workload other than the bundled prompt mix.
RATES = os.environ.get("LOADTEST_RATES", "").strip()
WORKLOAD = {k: os.environ.get(f"LOADTEST_{k}", "").strip() for k in ("INPUT_LEN", "OUTPUT_LEN", "DATASET")}
SWEEP: sweeps.Sweep | None = None  # built by on_init when RATES is set


@events.init.add_listener
def on_init(environment: Environment, **_kwargs: Any) -> None:
    global SWEEP
    keep_metrics_out_of_totals(environment.stats)
    opts = _options(environment)
    _think_time(opts.think_time)  # fail at start, not in every user
    try:
        if RATES and not isinstance(environment.runner, LocalRunner | None):
            raise ValueError(
                "a rate sweep runs in one locust process: leave out --processes, --master, --worker"
            )
        OpenAIUser.next_request = request_source(opts, environment.host or OpenAIUser.host)
        if RATES:
            SWEEP = sweeps.Sweep(
                _numbers("LOADTEST_RATES", RATES, float),
                parse_timespan(os.environ.get("LOADTEST_RUN_TIME") or "30s"),
                opts.arrival,
                drain_timeout=opts.request_timeout,
                seed=opts.seed,
            )
    except (ValueError, OSError) as exc:  # WorkloadError included: the run stops before it starts
        print(f"locustfile: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def _numbers(name: str, text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated numbers") from None


def server_context(host: str, api_key: str, timeout: float) -> int | None:
    """max_model_len of the first model of GET /v1/models (vLLM's and our server report it), else None."""
    url = f"{host.rstrip('/')}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.get(url, headers=headers, timeout=timeout)
        resp.raise_for_status()
        return resp.json()["data"][0].get("max_model_len")
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        raise WorkloadError(f"cannot read max_model_len from {url}: {type(exc).__name__}: {exc}") from exc


def request_source(opts: Any, host: str) -> Callable[[], Request]:
    """What each request sends: the workload, checked against the server's context."""
    input_len, output_len = (
        _numbers(f"LOADTEST_{k}", WORKLOAD[k] or "0", int)[0] for k in ("INPUT_LEN", "OUTPUT_LEN")
    )
    tokenizer = workloads.load_tokenizer(opts.tokenizer) if opts.tokenizer else None
    max_model_len = None
    if RATES or any(WORKLOAD.values()) or tokenizer is not None:
        max_model_len = server_context(
            host, opts.api_key or os.environ.get("OPENAI_API_KEY", ""), opts.request_timeout
        )
    if input_len:
        stream = workloads.random_requests(input_len, output_len or 128, max_model_len, tokenizer, opts.seed)
        return lambda: next(stream)
    if WORKLOAD["DATASET"]:
        reqs = workloads.sharegpt_requests(WORKLOAD["DATASET"], tokenizer, output_len or None)
    else:
        reqs = workloads.prompt_file_requests(load_prompts(opts.prompts), opts.max_tokens, output_len or None)
    if tokenizer is not None and max_model_len is not None:
        reqs, dropped = workloads.fit(reqs, max_model_len, workloads.token_counter(tokenizer))
        if dropped:
            print(
                f"locustfile: left out {len(dropped)} prompt(s) that do not fit the server's context of "
                f"{max_model_len} tokens: " + "; ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
                file=sys.stderr,
                flush=True,
            )
    rng = random.Random(opts.seed)
    return lambda: rng.choice(reqs)


def _merged(stats: RequestStats, method: str) -> StatsEntry:
    merged = StatsEntry(stats, method, method)
    for (_, m), entry in stats.entries.items():
        if m == method:
            merged.extend(entry)
    return merged


def _percentile(entry: StatsEntry, q: float) -> float | None:
    n = entry.num_requests - entry.num_none_requests
    return float(calculate_response_time_percentile(entry.response_times, n, q)) if n else None


def summarize(stats: RequestStats) -> dict[str, Any]:
    total = stats.total
    ttft, itl, tokps = _merged(stats, "TTFT"), _merged(stats, "ITL"), _merged(stats, "TOK/S")
    duration = (total.last_request_timestamp or total.start_time) - total.start_time
    output_tokens = tokps.total_content_length
    return {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "error_rate": total.fail_ratio,
        "duration_s": round(duration, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration, 2) if duration > 0 else 0.0,
        "ttft_ms": {
            "count": ttft.num_requests,
            "p50": _percentile(ttft, 0.5),
            "p95": _percentile(ttft, 0.95),
        },
        "itl_ms": {"count": itl.num_requests, "p50": _percentile(itl, 0.5), "p95": _percentile(itl, 0.95)},
        "request_tokens_per_s": {"p50": _percentile(tokps, 0.5), "p5": _percentile(tokps, 0.05)},
    }


def check_slos(summary: dict[str, Any], opts: Any) -> list[tuple[str, str, bool]]:
    """(name, 'measured vs limit', ok) for every SLO that is set."""
    checks = []
    if summary["requests"] == 0:
        checks.append(("requests", "no HTTP request completed", False))
    checks.append(
        (
            "error rate",
            f"{summary['error_rate']:.2%} ({summary['failures']}/{summary['requests']}) <= {opts.slo_max_error_rate:.2%}",
            summary["requests"] > 0 and summary["error_rate"] <= opts.slo_max_error_rate,
        )
    )
    for name, key, limit in (
        ("TTFT p95", "ttft_ms", opts.slo_ttft_p95_ms),
        ("ITL p95", "itl_ms", opts.slo_itl_p95_ms),
    ):
        if limit is not None:
            p95 = summary[key]["p95"]
            measured = "no samples" if p95 is None else f"{p95:.0f} ms"
            checks.append((name, f"{measured} <= {limit:g} ms", p95 is not None and p95 <= limit))
    if opts.slo_min_tokens_per_s is not None:
        rate = summary["output_tokens_per_s"]
        checks.append(
            (
                "output tokens/s",
                f"{rate:.1f} >= {opts.slo_min_tokens_per_s:g}",
                rate >= opts.slo_min_tokens_per_s,
            )
        )
    return checks


@events.quitting.add_listener
def on_quitting(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return  # the master holds the merged stats and judges
    if isinstance(runner, LocalRunner) and runner.state in (STATE_SPAWNING, STATE_RUNNING):
        # After Ctrl-C/SIGTERM the users are still running here: let in-flight requests finish (up to
        # --stop-timeout) so the summary and the verdict cover the same requests as locust's final tables.
        try:
            runner.stop()
        except KeyboardInterrupt:  # a second Ctrl-C: judge what has finished
            pass
    opts = _options(environment)
    summary = summarize(environment.stats)
    checks = check_slos(summary, opts)
    passed = all(ok for _, _, ok in checks)
    ttft, itl = summary["ttft_ms"], summary["itl_ms"]
    lines = [
        "dsv2-serve load test summary",
        f"  HTTP requests {summary['requests']}, failures {summary['failures']}, {summary['duration_s']:.1f} s",
        f"  TTFT p50/p95  {ttft['p50']} / {ttft['p95']} ms ({ttft['count']} samples)",
        f"  ITL  p50/p95  {itl['p50']} / {itl['p95']} ms ({itl['count']} samples)",
        f"  output tokens {summary['output_tokens']}, {summary['output_tokens_per_s']:.1f} tok/s aggregate",
        *(f"  SLO {name:<16} {text:<40} {'PASS' if ok else 'FAIL'}" for name, text, ok in checks),
        f"  SLO verdict: {'PASS' if passed else 'FAIL'}",
    ]
    if SWEEP is not None:
        lines += write_sweep(SWEEP, opts)
    _REPORT[:] = lines  # printed by on_quit, below locust's own final tables
    if getattr(opts, "csv_prefix", None):
        path = Path(f"{opts.csv_prefix}_summary.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        slos = [{"slo": name, "check": text, "ok": ok} for name, text, ok in checks]
        path.write_text(json.dumps({**summary, "slos": slos, "passed": passed}, indent=2) + "\n")
    if not passed:
        environment.process_exit_code = SLO_FAILED_EXIT_CODE
    elif not runner.exceptions and not locust_log.unhandled_greenlet_exception:
        # Failures within the error budget are not a failed run (locust alone would exit 1 on any).
        environment.process_exit_code = 0


def write_sweep(sweep: sweeps.Sweep, opts: Any) -> list[str]:
    """sweep.json, requests.jsonl, the plots and report.html into --report-dir; the summary lines."""
    csv_dir = Path(opts.csv_prefix).parent if getattr(opts, "csv_prefix", None) else None
    out = Path(opts.report_dir or csv_dir or "reports/loadtest")
    out.mkdir(parents=True, exist_ok=True)
    slos = sweeps.Goodput(opts.goodput_ttft_ms, opts.goodput_tpot_ms, opts.goodput_e2e_ms)
    phases = [p for p in sweep.phases if p.start]
    rows = [sweeps.summarize(p, sweep.arrival, slos) for p in phases]
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "requests.jsonl", "w") as f:
        for p in phases:
            for r in p.records:
                f.write(json.dumps(sweeps.request_row(p, r, slos)) + "\n")
    lines = [f"  rate sweep ({sweep.arrival}): {out}/sweep.json"]
    for row in rows:
        lines.append(
            f"    {row['rate']:g} req/s: {row['requests']} requests, {row['failures']} failed, "
            f"TTFT p50/p99 {_ms(row['ttft_ms'])}, TPOT p50/p99 {_ms(row['tpot_ms'])}, "
            f"{row['output_tok_s']:.1f} output tok/s, goodput {row['goodput']:.0%}"
        )
    try:
        requests_done = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
        report.render(out, rows, requests_done, title=f"of {opts.host or OpenAIUser.host}")
        lines.append(f"  plots and {out}/report.html written")
    except ImportError as exc:
        lines.append(f"  no plots ({exc}): pip install matplotlib, then python loadtests/report.py {out}")
    return lines


def _ms(p: dict[str, float | None]) -> str:
    return "/".join("-" if p[q] is None else f"{p[q]:.0f}" for q in ("p50", "p99")) + " ms"


@events.quit.add_listener
def on_quit(exit_code: int, **_kwargs: Any) -> None:
    if _REPORT:
        print("\n".join([*_REPORT, f"  exit code {exit_code}"]), flush=True)


# ---------------------------------------------------------------------------------------------- users


class OpenAIUser(HttpUser):
    """Shared plumbing: model discovery, auth, request bodies, SSE parsing, metric events."""

    abstract = True
    host = os.environ.get("DSV2_TARGET") or DEFAULT_TARGET
    next_request: Callable[[], Request]  # the workload, set by on_init
    model: str | None = None  # resolved once per process
    _model_lock = gevent.lock.Semaphore()

    def wait_time(self) -> float:
        return random.uniform(*_think_time(_options(self.environment).think_time))

    def on_start(self) -> None:
        opts = _options(self.environment)
        self.timeout = opts.request_timeout
        key = opts.api_key or os.environ.get("OPENAI_API_KEY", "")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        with OpenAIUser._model_lock:
            if OpenAIUser.model is None:
                OpenAIUser.model = (
                    opts.model or os.environ.get("DSV2_SERVED_MODEL_NAME") or self._discover_model()
                )

    def _discover_model(self) -> str:
        with self.client.get("/v1/models", name="models", catch_response=True, timeout=self.timeout) as resp:
            try:
                return resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"cannot discover the model: {_http_error(resp)}")
        raise StopUser()

    def _body(self, r: Request, stream: bool, **fields: Any) -> dict[str, Any]:
        body = {"model": self.model, **fields, "max_tokens": r.max_tokens, "stream": stream}
        if r.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extra: exactly max_tokens tokens
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _chat_body(self, stream: bool) -> dict[str, Any]:
        r = OpenAIUser.next_request()
        messages = [{"role": "system", "content": r.system}] if r.system else []
        messages.append({"role": "user", "content": r.prompt})
        return self._body(r, stream, messages=messages)

    def _completion_body(self, stream: bool) -> dict[str, Any]:
        r = OpenAIUser.next_request()
        return self._body(r, stream, prompt=r.prompt)

    def _metric(self, kind: str, scenario: str, value: float, size: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=scenario,
            response_time=value,
            response_length=size,
            exception=None,
            context={},
        )

    def stream(self, path: str, body: dict[str, Any], scenario: str) -> sweeps.Record:
        """POST with stream=true; the request is recorded once, with its end-to-end time, when the block ends."""
        start = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        chunks = nbytes = 0
        usage = None
        ok = False
        with self.client.post(
            path, json=body, name=scenario, stream=True, catch_response=True, timeout=self.timeout
        ) as resp:
            try:
                if resp.status_code != 200:
                    raise _Failed(_http_error(resp))
                done = False
                for line in resp.iter_lines(chunk_size=None):
                    nbytes += len(line) + 1
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        raise _Failed(f"error event in stream: {event['error']}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        text = (
                            (choice.get("delta") or {}).get("content")
                            if "delta" in choice
                            else choice.get("text")
                        )
                        if text:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            else:
                                gaps.append(now - last)
                            last = now
                            chunks += 1
                if not done:
                    raise _Failed("stream ended without data: [DONE]")
                ok = True
            except _Failed as exc:
                resp.failure(str(exc))
            # A reset connection, a read timeout, a malformed chunk: one failed request, not a crashed user.
            except Exception as exc:
                resp.failure(f"{type(exc).__name__}: {exc}")
            finally:
                end = time.perf_counter()
                resp.request_meta["response_time"] = (end - start) * 1000
                resp.request_meta["response_length"] = nbytes
        if not ok:
            return sweeps.Record(False, start, end)
        # A random-weight model may emit EOS first: a valid, empty answer that only counts its tokens.
        tokens = usage["completion_tokens"] if usage else chunks
        record = sweeps.Record(
            True,
            start,
            end,
            ttft_ms=None if first is None else (first - start) * 1000,
            tpot_ms=None if first is None else sweeps.tpot_ms(first, last, tokens),
            itl_ms=[gap * 1000 for gap in gaps],
            prompt_tokens=usage.get("prompt_tokens", 0) if usage else 0,
            output_tokens=tokens,
        )
        if record.ttft_ms is not None:
            self._metric("TTFT", scenario, record.ttft_ms, record.prompt_tokens)
        if record.tpot_ms is not None:
            self._metric("TPOT", scenario, record.tpot_ms)
        for gap in record.itl_ms:
            self._metric("ITL", scenario, gap)
        self._metric("TOK/S", scenario, tokens / (end - start), tokens)
        return record

    def call(self, path: str, body: dict[str, Any], scenario: str) -> None:
        start = time.perf_counter()
        with self.client.post(
            path, json=body, name=scenario, catch_response=True, timeout=self.timeout
        ) as resp:
            if resp.status_code != 200:
                resp.failure(_http_error(resp))
                return
            try:
                payload = resp.json()
                if not payload["choices"]:
                    raise ValueError("no choices")
                tokens = int(payload["usage"]["completion_tokens"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                resp.failure(f"malformed response ({type(exc).__name__}: {exc}): {resp.text[:200]}")
                return
        self._metric("TOK/S", scenario, tokens / (time.perf_counter() - start), tokens)


class _Failed(Exception):
    """A failed request, with the message locust records for it."""


class ChatStreamUser(OpenAIUser):
    weight = 3

    @task
    def chat_stream(self) -> None:
        self.stream("/v1/chat/completions", self._chat_body(stream=True), "chat-stream")


class ChatUser(OpenAIUser):
    weight = 1

    @task
    def chat(self) -> None:
        self.call("/v1/chat/completions", self._chat_body(stream=False), "chat")


class CompletionUser(OpenAIUser):
    weight = 1

    @task
    def completion_stream(self) -> None:
        self.stream("/v1/completions", self._completion_body(stream=True), "completion-stream")

    @task
    def completion(self) -> None:
        self.call("/v1/completions", self._completion_body(stream=False), "completion")


class WorkloadUser(OpenAIUser):
    """Closed loop over LOADTEST_INPUT_LEN / _OUTPUT_LEN / _DATASET: streamed completions, one after another."""

    abstract = True  # made concrete at the bottom of the file when a workload is set

    @task
    def completion_stream(self) -> None:
        self.stream("/v1/completions", self._completion_body(stream=True), "completion-stream")


class ArrivalUser(OpenAIUser):
    """Open loop: sends each streamed completion at its arrival time, in a greenlet of its own, so requests
    overlap as they arrive whatever earlier ones are doing. One user does it all; SweepShape moves the rates.
    A late arrival (the process was busy) is sent at once: every rate sends all of its requests."""

    abstract = True
    # A kept-alive connection for every request in flight, not the default pool of 10.
    pool_manager = PoolManager(maxsize=1024)

    def on_start(self) -> None:
        super().on_start()
        self.in_flight = gevent.pool.Group()

    def wait_time(self) -> float:
        assert SWEEP is not None
        phase = SWEEP.current
        due = phase.due() if phase is not None else None
        return 0.05 if due is None else max(0.0, due - time.perf_counter())  # poll while a rate drains

    @task
    def arrive(self) -> None:
        assert SWEEP is not None
        phase = SWEEP.current
        due = phase.due() if phase is not None else None
        if due is None or time.perf_counter() < due:
            return
        body = self._completion_body(stream=True)
        phase.sent += 1
        self.in_flight.spawn(self.fire, phase, body)

    def fire(self, phase: sweeps.Phase, body: dict[str, Any]) -> None:
        record = sweeps.Record(False, time.perf_counter(), time.perf_counter())
        try:
            record = self.stream("/v1/completions", body, phase.name)
        finally:  # counted even if the greenlet dies, so the drain never waits for it
            phase.records.append(record)


def _http_error(resp: Any) -> str:
    if resp.error is not None and not resp.status_code:
        return f"{type(resp.error).__name__}: {resp.error}"
    return f"HTTP {resp.status_code}: {(resp.text or '')[:200]}"


# ---------------------------------------------------------------------------------------------- shapes


def _common(shape: LoadTestShape) -> tuple[int, float, float]:
    """(--users, --spawn-rate, --run-time) with the defaults a shape needs."""
    opts = shape.runner.environment.parsed_options
    return max(1, opts.num_users or 1), max(0.1, opts.spawn_rate or 1.0), float(opts.run_time or 60)


class StepShape(LoadTestShape):
    """--users reached in --steps equal steps, each held --run-time/--steps seconds; then stop."""

    abstract = True  # only the class picked by LOADTEST_SHAPE is made concrete below
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = _common(self)
        t = self.get_run_time()
        if t >= run_time:
            return None
        steps = max(1, _options(self.runner.environment).steps)
        step = min(steps, int(t * steps / run_time) + 1)
        return math.ceil(users * step / steps), rate


class RampShape(LoadTestShape):
    """Linear ramp 1 -> --users over the first third of --run-time, hold the middle third, ramp down to 1."""

    abstract = True
    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        users, rate, run_time = _common(self)
        t = self.get_run_time()
        if t >= run_time:
            return None
        third = run_time / 3
        level = min(t, third, run_time - t) / third  # 0..1..0
        return max(1, math.ceil(users * level)), rate


class SweepShape(LoadTestShape):
    """LOADTEST_RATES: one ArrivalUser while the sweep runs (each rate fires, then drains); stop after the last."""

    abstract = True

    def tick(self) -> tuple[int, float, list[type[User]]] | None:
        assert SWEEP is not None
        return (1, 1, [ArrivalUser]) if SWEEP.advance(time.perf_counter()) else None


SHAPES: dict[str, type[LoadTestShape]] = {"step": StepShape, "ramp": RampShape}
_shape = os.environ.get("LOADTEST_SHAPE", "").strip().lower()
if _shape and RATES:
    raise ValueError(
        f"LOADTEST_SHAPE={_shape!r} and LOADTEST_RATES={RATES!r}: a sweep is its own shape; set one"
    )
if _shape:
    if _shape not in SHAPES:
        raise ValueError(f"LOADTEST_SHAPE={_shape!r}; choose one of {sorted(SHAPES)} or leave it unset")
    SelectedShape = type(SHAPES[_shape].__name__, (SHAPES[_shape],), {"abstract": False})
if RATES:
    SelectedShape = type("SweepShape", (SweepShape,), {"abstract": False})
# Only the users of the chosen load run: the open-loop one, the workload's, or the three above.
ChatStreamUser.abstract = ChatUser.abstract = CompletionUser.abstract = bool(RATES or any(WORKLOAD.values()))
WorkloadUser.abstract = bool(RATES) or not any(WORKLOAD.values())
ArrivalUser.abstract = not RATES
