"""Benchmark (not a test): the cost of guaranteed tool calls. One server; the same request three ways, taking
turns round by round:

  guided      tools + a named tool_choice: the structural tag constrains every token of the call
  unguided    the same prompt (tools listed, tool_choice "none"), generating exactly as many tokens
  no-tools    the request without tools (a shorter prompt), as many tokens again

    python bench/bench_tools.py [--model DIR] [--concurrency 1,8 --requests 24 --rounds 3] [-- ENGINE FLAGS]

Prints latency p50/p99 per target, time per output token, and the ratio guided / unguided (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_gateway import MODEL_NAME, pct, serve

PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo", "Lima", "Oslo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "enum": [1, 2, 3, 4, 5, 6, 7]},
        "hourly": {"type": "boolean"},
        "fields": {
            "type": "array",
            "items": {"type": "string", "enum": ["temp", "wind", "rain", "uv"]},
            "maxItems": 4,
        },
    },
    "required": ["city", "unit", "days", "hourly", "fields"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "forecast", "description": "Weather forecast.", "parameters": PARAMS},
    }
]
MESSAGES = [{"role": "user", "content": "Will it rain in Oslo this week?"}]


def body(target: str, tokens: int, seed: int) -> dict:
    base = {"model": MODEL_NAME, "messages": MESSAGES, "temperature": 1.0, "seed": seed}
    if target == "guided":
        return {**base, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "forecast"}}}
    extra = {"tools": TOOLS, "tool_choice": "none"} if target == "unguided" else {}
    return {**base, **extra, "max_tokens": tokens, "ignore_eos": True}


async def run_round(
    url: str, target: str, concurrency: int, requests: int, lengths: list[int]
) -> tuple[list, int]:
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))
    async with httpx.AsyncClient(timeout=600) as client:

        async def worker() -> None:
            nonlocal tokens
            while queue:
                i = queue.pop()
                start = time.perf_counter()
                r = await client.post(url + "/v1/chat/completions", json=body(target, lengths[i], i))
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)
                n = r.json()["usage"]["completion_tokens"]
                tokens += n
                if target == "guided":
                    lengths[i] = n  # the other targets generate exactly as many tokens
                    assert r.json()["choices"][0]["message"]["tool_calls"], r.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, tokens


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory; default: a fresh tiny checkpoint")
    parser.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("engine_args", nargs="*", help="vLLM engine flags (after --)")
    a = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tools-"))
    if a.model is None:
        from server.tiny_model import write_tiny_model

        a.model = str(write_tiny_model(tmp / "tiny"))
    cmd = [sys.executable, "-m", "server", "serve", "--model", a.model]
    cmd += [
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        "2048",
        "--log-level",
        "warning",
        *a.engine_args,
    ]
    proc, url = serve(lambda port: [*cmd, "--port", str(port)], tmp / "server.log", "/ready")
    try:
        targets = ["guided", "unguided", "no-tools"]
        for c in a.concurrency:
            lengths = [0] * a.requests
            asyncio.run(run_round(url, "guided", c, a.requests, lengths))  # warm-up; fixes the lengths
            results = {t: ([], 0) for t in targets}
            for r in range(a.rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                for t in order:
                    lat, tok = asyncio.run(run_round(url, t, c, a.requests, lengths))
                    results[t] = (results[t][0] + lat, results[t][1] + tok)
            print(f"== concurrency {c}: {a.rounds} rounds x {a.requests} requests per target ==")
            for t in targets:
                lat, tok = results[t]
                per_token = sum(lat) / tok * 1000 if tok else float("nan")
                print(
                    f"{t:10s} latency p50 {pct(lat, 50) * 1000:8.1f} ms  p99 {pct(lat, 99) * 1000:8.1f} ms  "
                    f"tokens {tok:6d}  ms/token {per_token:6.2f}"
                )
            g, u = results["guided"][0], results["unguided"][0]
            print(
                f"guided / unguided latency p50 {pct(g, 50) / pct(u, 50):.2f}x  p99 {pct(g, 99) / pct(u, 99):.2f}x"
            )
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"logs: {tmp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
