"""Benchmark (not a test): our gateway vs vLLM's own OpenAI server vs the engine alone, same model, same
engine flags, same load, rounds alternating between targets.

    python bench/bench_gateway.py [--model DIR] [--concurrency 1,8,32 --requests 48 --max-tokens 96 --rounds 3]
    python bench/bench_gateway.py --model /tmp/tiny -- --enforce-eager      # engine flags for every target

Prints output tok/s, TTFT p50/p99 and inter-token latency p50/p99 per target, and the ratios
gateway / vLLM-server (tok/s: higher is better, so >= 1.00 is the goal; latencies: vLLM / gateway, so
>= 1.00 also means the gateway is at least as fast); and the CPU time the serving process spends per streamed
token (the HTTP front end and vLLM's in-process output handling, the engine core's own process excluded), the
ceiling of tokens per second one such process implies, and the ratio vLLM / gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ports.py, from a checkout
from tests import ports  # noqa: E402

PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Write a short poem about autumn rain.",
    "What is the capital of France and why is it famous?",
]
MODEL_NAME = "bench-model"


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    cpu: float = 0.0  # CPU seconds of the serving process during the round (HTTP targets)

    def merge(self, other: Result) -> None:
        self.ttft += other.ttft
        self.itl += other.itl
        self.tokens += other.tokens
        self.wall += other.wall
        self.errors += other.errors
        self.cpu += other.cpu

    @property
    def cpu_us_per_token(self) -> float:
        return self.cpu / self.tokens * 1e6 if self.tokens else float("nan")

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included, its child processes not): /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# --- HTTP targets ----------------------------------------------------------------------------------------------


def serve(
    cmd: Callable[[int], list[str]], log: Path, ready_path: str, timeout: float = 900
) -> tuple[subprocess.Popen, str]:
    """Start `cmd(port)` on a port of its own (tests/ports.py: outside the ephemeral range, retried if another
    listener takes it) and wait until `ready_path` answers 200; the process and its base URL."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}

    def spawn(port: int) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(cmd(port), stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    proc, port = ports.launch(spawn, log, ready, timeout)
    return proc, f"http://127.0.0.1:{port}"


async def one_http_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = Result()
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            r.errors += 1
            return r
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage") and not chunk["choices"]:
                r.tokens += chunk["usage"]["completion_tokens"]
                continue
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if last is None:
                    r.ttft.append(now - start)
                else:
                    r.itl.append(now - last)
                last = now
    return r


async def http_round(
    url: str, concurrency: int, requests: int, max_tokens: int, pid: int | None = None
) -> Result:
    total = Result()
    cpu_before = cpu_seconds(pid) if pid else 0.0
    queue = list(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                total.merge(await one_http_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        total.wall = time.perf_counter() - start
    if pid:
        total.cpu = cpu_seconds(pid) - cpu_before
    return total


# --- engine alone (AsyncLLM in this process, no HTTP) --------------------------------------------------------------


class EngineAlone:
    def __init__(self, model: str, engine_args: list[str]) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
        args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model, *engine_args]))
        self.llm = AsyncLLM.from_engine_args(args)
        tok = AutoTokenizer.from_pretrained(model)
        self.prompts = [
            tok.encode(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )
            for p in PROMPTS
        ]

    async def one(self, i: int, max_tokens: int) -> Result:
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        r = Result()
        start = time.perf_counter()
        last = None
        async for out in self.llm.generate(
            tokens_input(self.prompts[i % len(self.prompts)]), params, f"b-{i}-{start}"
        ):
            n = len(out.outputs[0].token_ids)
            if n:
                now = time.perf_counter()
                if last is None:
                    r.ttft.append(now - start)
                else:
                    r.itl.append(now - last)
                last = now
                r.tokens += n
        return r

    async def round(self, concurrency: int, requests: int, max_tokens: int) -> Result:
        total = Result()
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                total.merge(await self.one(queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        total.wall = time.perf_counter() - start
        return total


# --- main ------------------------------------------------------------------------------------------------------------


def summary(name: str, r: Result) -> str:
    return (
        f"{name:<14} tok/s {r.tok_s:8.1f}  TTFT p50 {pct(r.ttft, 50) * 1e3:7.1f} ms  p99 {pct(r.ttft, 99) * 1e3:7.1f} ms"
        f"  ITL p50 {pct(r.itl, 50) * 1e3:6.2f} ms  p99 {pct(r.itl, 99) * 1e3:6.2f} ms  errors {r.errors}"
    )


def report(conc: int, results: dict[str, Result]) -> None:
    print(f"\n== concurrency {conc}: totals ==")
    for name, r in results.items():
        print(summary(name, r))
    g, v = results["gateway"], results["vllm-server"]
    print(
        f"== concurrency {conc}: gateway vs vLLM's server (>= 1.00 means the gateway is at least as good) =="
    )
    print(f"output tok/s        gateway/vllm  {g.tok_s / v.tok_s:5.2f}x")
    print(
        f"front-end CPU per streamed token  gateway {g.cpu_us_per_token:6.1f} us ({1e6 / g.cpu_us_per_token:,.0f} "
        f"tok/s per process)  vLLM server {v.cpu_us_per_token:6.1f} us ({1e6 / v.cpu_us_per_token:,.0f} tok/s)  "
        f"vllm/gateway {v.cpu_us_per_token / g.cpu_us_per_token:5.2f}x"
    )
    for label, gx, vx in (
        ("TTFT p50", pct(g.ttft, 50), pct(v.ttft, 50)),
        ("TTFT p99", pct(g.ttft, 99), pct(v.ttft, 99)),
        ("ITL p50", pct(g.itl, 50), pct(v.itl, 50)),
        ("ITL p99", pct(g.itl, 99), pct(v.itl, 99)),
    ):
        print(f"{label:<19} vllm/gateway  {vx / gx:5.2f}x")
    if "engine-alone" in results:
        e = results["engine-alone"]
        print(
            f"gateway tok/s / engine alone: {g.tok_s / e.tok_s:5.2f}x   "
            f"vLLM server / engine alone: {v.tok_s / e.tok_s:5.2f}x"
        )


def server_flags(engine_args: list[str]) -> list[str]:
    """The flags every target of a benchmark gets. On CPU --gpu-memory-utilization is the share of host memory
    vLLM checks is free: several engines share the machine here."""
    return ["--served-model-name", MODEL_NAME, "--max-model-len", "1024", "--gpu-memory-utilization", "0.2",
            *engine_args]  # fmt: skip


def tiny_model(tmp: Path) -> str:
    """A tiny checkpoint written under `tmp`, for a benchmark given no --model."""
    from server.tiny_model import write_tiny_model

    return str(write_tiny_model(tmp / "tiny"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory or repo id; default: a fresh tiny checkpoint")
    parser.add_argument(
        "--concurrency",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 8],
        help="comma-separated concurrencies, each measured for every target (default 1,8)",
    )
    parser.add_argument("--requests", type=int, default=48, help="requests per round per target")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-engine-alone", action="store_true")
    parser.add_argument("engine_args", nargs="*", help="vLLM engine flags given to every target (after --)")
    a = parser.parse_args()

    flags = server_flags(a.engine_args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    a.model = a.model or tiny_model(tmp)
    ours = theirs = None
    try:
        ours, ours_url = serve(
            lambda port: [
                sys.executable, "-m", "server", "serve", "--model", a.model, "--port", str(port),
                "--log-level", "warning", *flags,
            ],
            tmp / "gateway.log",
            "/ready",
        )  # fmt: skip
        theirs, vllm_url = serve(
            lambda port: [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", a.model,
                "--port", str(port), "--uvicorn-log-level", "warning", *flags,
            ],
            tmp / "vllm.log",
            "/health",
        )  # fmt: skip
        targets = {"gateway": ours_url, "vllm-server": vllm_url}
        pids = {"gateway": ours.pid, "vllm-server": theirs.pid}
        engine = None if a.no_engine_alone else EngineAlone(a.model, flags)
        names = [*targets, *([] if engine is None else ["engine-alone"])]
        results = {(c, name): Result() for c in a.concurrency for name in names}

        async def bench() -> None:
            for url in targets.values():  # warm-up
                await http_round(url, 4, 4, 8)
            for conc in a.concurrency:
                for rnd in range(a.rounds):
                    order = list(targets.items()) if rnd % 2 == 0 else list(reversed(targets.items()))
                    for name, url in order:
                        r = await http_round(url, conc, a.requests, a.max_tokens, pids[name])
                        print(f"c={conc:<3} round {rnd + 1} {summary(name, r)}", flush=True)
                        results[conc, name].merge(r)
                    if engine is not None:
                        r = await engine.round(conc, a.requests, a.max_tokens)
                        print(f"c={conc:<3} round {rnd + 1} {summary('engine-alone', r)}", flush=True)
                        results[conc, "engine-alone"].merge(r)

        asyncio.run(bench())
        for conc in a.concurrency:
            report(conc, {name: results[conc, name] for name in names})
        print(f"\nlogs: {tmp}")
        if engine is not None:
            engine.llm.shutdown()
    finally:
        started = [proc for proc in (ours, theirs) if proc is not None]
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
