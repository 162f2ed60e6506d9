"""Benchmark (not a test): our locust load test against vLLM's own `vllm bench serve`, on the same running server
and the same workload.

    python bench/bench_loadtest.py [--target URL] [--tokenizer DIR] [--rate 2 --run-time 30 --rounds 3]
    python bench/bench_loadtest.py --model .cache/tiny-dsv2 -- --enforce-eager   # start a server for the run

Workload: random-token prompts of --input-len tokens, exactly --output-len output tokens (`ignore_eos`), streamed
/v1/completions, --rate requests/s for --run-time s (rate x run time requests), Poisson arrivals (vLLM's
`--burstiness 1`) or constant ones (`--burstiness inf`). Ours is `loadtests/run.sh` with DSV2_TARGET and the
LOADTEST_* knobs, read from its sweep.json; vLLM's is the benchmark module of the installed vLLM (the `vllm`
console script of the CPU build cannot read its own version), read from its --save-result JSON.

--mode together (default) runs both tools at the same time, each at --rate, so both measure the same server in
the same seconds and a shared, noisy machine disturbs both alike; --mode alternate runs one after the other,
who goes first alternating by round, and shows how much the machine moves between two runs.

Prints, per round and as the median over rounds, TTFT p50/mean, TPOT p50/mean and output tokens/s of both,
and the ratios ours / vLLM's. Agreement: the medians of the per-round ratios of TTFT p50, TPOT p50 and output
tokens/s within 1 +- --tolerance (10%); exit code 0 when they agree, 1 when not. --fake TTFT_MS,ITL_MS
measures a fake server with exactly those timings instead (how exact each tool is, free of engine noise).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import serve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# (label, our sweep.json path, vLLM's result key)
METRICS = (
    ("TTFT p50 ms", ("ttft_ms", "p50"), "median_ttft_ms"),
    ("TTFT mean ms", ("ttft_ms", "mean"), "mean_ttft_ms"),
    ("TPOT p50 ms", ("tpot_ms", "p50"), "median_tpot_ms"),
    ("TPOT mean ms", ("tpot_ms", "mean"), "mean_tpot_ms"),
    ("output tok/s", ("output_tok_s",), "output_throughput"),
)
# Agreement is judged on these; the means are shown too, but one slow request moves a mean of a few dozen.
JUDGED = ("TTFT p50 ms", "TPOT p50 ms", "output tok/s")
# vLLM's benchmark, called as `vllm bench serve` calls it.
VLLM_BENCH = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


def ours_env(args: argparse.Namespace, out: Path, tokenizer: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADTEST_", "LOCUST_", "DSV2_"))}
    return env | {
        "PY": sys.executable,
        "DSV2_TARGET": args.target,
        "LOADTEST_RATES": f"{args.rate:g}",
        "LOADTEST_ARRIVAL": args.arrival,
        "LOADTEST_RUN_TIME": f"{args.run_time:g}s",
        "LOADTEST_INPUT_LEN": str(args.input_len),
        "LOADTEST_OUTPUT_LEN": str(args.output_len),
        "LOADTEST_TOKENIZER": tokenizer,
        "LOADTEST_SEED": str(args.seed),
        "LOADTEST_REPORT_DIR": str(out),
    }


def read_ours(out: Path) -> dict[str, float]:
    (row,) = json.loads((out / "sweep.json").read_text())
    result = {}
    for label, path, _ in METRICS:
        value = row
        for key in path:
            value = value[key]
        result[label] = value
    result["requests"], result["failures"] = row["requests"], row["failures"]
    return result


def vllm_cmd(args: argparse.Namespace, model: str, out: Path) -> list[str]:
    return [
        sys.executable, "-c", VLLM_BENCH,
        "--backend", "openai", "--base-url", args.target, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", args.tokenizer,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(round(args.rate * args.run_time)), "--request-rate", f"{args.rate:g}",
        "--burstiness", "1" if args.arrival == "poisson" else "inf", "--seed", str(args.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out), "--result-filename", "vllm.json", "--disable-tqdm",
    ]  # fmt: skip


def read_vllm(out: Path) -> dict[str, float]:
    data = json.loads((out / "vllm.json").read_text())
    result = {label: data[key] for label, _, key in METRICS}
    result["requests"], result["failures"] = data["completed"] + data["failed"], data["failed"]
    return result


def check(proc: subprocess.Popen | subprocess.CompletedProcess, name: str, log: Path) -> None:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        )


def alternate(args: argparse.Namespace, model: str, out: Path, ours_first: bool) -> tuple[dict, dict]:
    """One tool after the other, in the given order."""
    for name in ("ours", "vllm") if ours_first else ("vllm", "ours"):
        log = out / f"{name}.log"
        with open(log, "w") as f:
            if name == "ours":
                env = ours_env(args, out, args.tokenizer)
                proc = subprocess.run(["bash", "loadtests/run.sh"], cwd=REPO, env=env, stdout=f, stderr=f)
            else:
                proc = subprocess.run(vllm_cmd(args, model, out), cwd=REPO, stdout=f, stderr=f)
        check(proc, name, log)
    return read_ours(out), read_vllm(out)


def together(args: argparse.Namespace, model: str, out: Path) -> tuple[dict, dict]:
    """Both tools at once, each at --rate: they measure the same server in the same seconds, so the machine's
    noise is common to both. Ours starts when vLLM's main run does (its start-up takes longer); without a
    tokenizer, ours starts in about a second and draws ids from 100..999."""
    vlog, olog = out / "vllm.log", out / "ours.log"
    with open(vlog, "w") as vf, open(olog, "w") as of:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        v = subprocess.Popen(vllm_cmd(args, model, out), cwd=REPO, stdout=vf, stderr=vf, env=env)
        while "Starting main benchmark run" not in vlog.read_text(errors="replace"):
            if v.poll() is not None:
                check(v, "vLLM's benchmark", vlog)
            time.sleep(0.05)
        started = time.time()
        o = subprocess.Popen(
            ["bash", "loadtests/run.sh"], cwd=REPO, env=ours_env(args, out, ""), stdout=of, stderr=of
        )
        o.wait()
        v.wait()
    check(o, "loadtests/run.sh", olog)
    check(v, "vLLM's benchmark", vlog)
    a, b = read_ours(out), read_vllm(out)
    a["start lag s"] = _locust_start(olog) - started
    return a, b


def _locust_start(log: Path) -> float:
    """Wall time of locust's "Shape test starting" line: when our first rate began."""
    for line in log.read_text(errors="replace").splitlines():
        if "Shape test starting" in line:
            stamp = line[1 : line.index("]")]  # [2026-12-03 14:21:53,814]
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return float("nan")


def serve_fake(port: int, ttft_ms: float, itl_ms: float) -> None:
    """An OpenAI completions endpoint with known timings: the first token after ttft_ms, then one every itl_ms.
    Both tools should measure exactly these, whatever else the machine is doing to the real engine."""
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def sse(obj: dict) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def models(_: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 8192}]}
        )

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        n, prompt = body["max_tokens"], body["prompt"]
        usage = {
            "prompt_tokens": len(prompt) if isinstance(prompt, list) else len(prompt.split()),
            "completion_tokens": n,
        }

        async def events():
            await asyncio.sleep(ttft_ms / 1000)
            for i in range(n):
                if i:
                    await asyncio.sleep(itl_ms / 1000)
                finish = "length" if i == n - 1 else None
                yield sse(
                    {
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": " x", "finish_reason": finish}],
                    }
                )
            yield sse({"object": "text_completion", "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    routes = [
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", lambda _: JSONResponse({})),
    ]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning")


def table(rows: list[tuple[str, dict[str, float], dict[str, float]]]) -> str:
    labels = [label for label, _, _ in METRICS]
    lines = [
        "| run | tool | requests | failures | " + " | ".join(labels) + " |",
        "|---" * (4 + len(labels)) + "|",
    ]
    for name, a, b in rows:
        for tool, r in (("locust (ours)", a), ("vllm bench serve", b)):
            values = " | ".join(f"{r[label]:.1f}" for label in labels)
            lines.append(f"| {name} | {tool} | {r['requests']:.0f} | {r['failures']:.0f} | {values} |")
        lines.append(
            f"| {name} | **ours / vLLM** | | | " + " | ".join(f"{a[x] / b[x]:.3f}" for x in labels) + " |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="", help="a running server; default: start one on --model")
    p.add_argument(
        "--model", default=".cache/tiny-dsv2", help="checkpoint to serve when --target is not given"
    )
    p.add_argument("--tokenizer", default="", help="the served model's tokenizer; default: --model")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--run-time", type=float, default=30.0, help="seconds of arrivals per run")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--mode",
        choices=("together", "alternate"),
        default="together",
        help="together: both tools at once, each at --rate; alternate: one after the other",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--json", default="", help="write every round and the medians here")
    p.add_argument(
        "--fake",
        metavar="TTFT_MS,ITL_MS",
        default="",
        help="measure a fake server with these exact timings instead of the engine (accuracy, not noise)",
    )
    p.add_argument(
        "--serve-fake", type=int, default=0, help=argparse.SUPPRESS
    )  # the fake server's own process
    p.add_argument("server_args", nargs="*", help="after --: extra flags for the server this script starts")
    args = p.parse_args()
    args.tokenizer = args.tokenizer or args.model
    if args.serve_fake:
        serve_fake(args.serve_fake, *(float(x) for x in args.fake.split(",")))
        return 0

    server = None
    work = Path(tempfile.mkdtemp(prefix="bench-loadtest-"))
    try:
        if args.fake:
            fake = [sys.executable, __file__, "--fake", args.fake, "--serve-fake"]
            server, args.target = serve(lambda port: [*fake, str(port)], work / "fake.log", "/health")
        elif not args.target:
            if not (Path(args.model) / "config.json").exists():
                subprocess.run(
                    [sys.executable, "-m", "server", "tiny-model", args.model], cwd=REPO, check=True
                )
            cmd = [sys.executable, "-m", "server", "serve", "--model", args.model, "--max-model-len", "2048"]
            server, args.target = serve(
                lambda port: [*cmd, "--port", str(port), *args.server_args], work / "server.log", "/ready"
            )
        model = httpx.get(f"{args.target}/v1/models", timeout=30).json()["data"][0]["id"]
        print(
            f"{args.target} ({model}): {args.rate:g} req/s {args.arrival} per tool, {args.run_time:g} s, "
            f"{args.input_len} in / {args.output_len} out, {args.rounds} rounds, {args.mode}",
            flush=True,
        )
        rows = []
        for i in range(args.rounds):
            out = work / f"round{i}"
            out.mkdir()
            if args.mode == "together":
                a, b = together(args, model, out)
            else:  # who goes first alternates, so that neither always runs on the warmer (or busier) machine
                a, b = alternate(args, model, out, ours_first=i % 2 == 0)
            rows.append((f"round {i + 1}", a, b))
            print(table(rows[-1:]), flush=True)
            if "start lag s" in a:
                print(f"ours began {a['start lag s']:.2f} s after vLLM's main run", flush=True)
        medians = tuple(
            {k: statistics.median(r[k] for r in side) for k in side[0] if k != "start lag s"}
            for side in ([a for _, a, _ in rows], [b for _, _, b in rows])
        )
        print("\n" + table([*rows, ("median", *medians)]))
        # Each round is a pair measured under the same conditions: the headline is the median of the
        # per-round ratios (between rounds, this machine moves latencies by 2-5x).
        ratios = {
            label: statistics.median(a[label] / b[label] for _, a, b in rows) for label, _, _ in METRICS
        }
        agree = all(abs(ratios[label] - 1) <= args.tolerance for label in JUDGED)
        print(
            "\nmedian of per-round ratios ours / vLLM: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
        )
        print(f"agreement of {', '.join(JUDGED)} within {args.tolerance:.0%}: {'yes' if agree else 'NO'}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"args": vars(args), "rounds": rows, "medians": medians, "ratios": ratios}, indent=2
                )
            )
        return 0 if agree else 1
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
