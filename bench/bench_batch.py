"""Benchmark (not a test): interactive latency with and without a large batch running on spare capacity.

    python bench/bench_batch.py [--model DIR] [--concurrency 4 --live-requests 32 --live-max-tokens 48]
        [--batch-lines 400 --batch-max-tokens 48 --batch-max-sequences 4 --batch-busy-max-sequences 0]
        [--rounds 2] [-- ENGINE FLAGS]

One server (`--scheduling-policy priority`, batch lines at --batch-priority 100); rounds alternate between the
same fixed live load (`--concurrency` streamed chats at a time, `--live-requests` in all) alone and with a batch of
`--batch-lines` lines in progress. Prints TTFT and TPOT (time per output token after the first) p50/p99 of each,
the ratios with/without (the goal: <= 1.2), the batch lines finished while the live load ran and in the same time
after it stopped (the batch must still advance when live load drops).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ports.py, from a checkout
from tests import ports  # noqa: E402

MODEL_NAME = "bench-model"
HEADERS: dict[str, str] = {}  # Authorization, with --api-key
PROMPT = "Tell me a story about a lighthouse keeper."


@dataclass
class Live:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: int = 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def serve(model: str, log: Path, batch_dir: Path, args: argparse.Namespace, engine_args: list[str]):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}

    def spawn(port: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "server", "serve", "--model", model, "--served-model-name", MODEL_NAME]
        cmd += ["--port", str(port), "--scheduling-policy", "priority", "--batch-dir", str(batch_dir)]
        cmd += ["--batch-max-sequences", str(args.batch_max_sequences), "--batch-poll-seconds", "0.2"]
        cmd += ["--batch-busy-max-sequences", str(args.batch_busy_max_sequences)]
        with open(log, "wb") as out:
            return subprocess.Popen([*cmd, *engine_args], stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    proc, port = ports.launch(spawn, log, ready, 900)
    return proc, f"http://127.0.0.1:{port}"


async def one_live(client: httpx.AsyncClient, url: str, max_tokens: int, out: Live) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            out.errors += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                tokens += 1
    if first is not None:
        out.ttft.append(first - start)
        if tokens > 1:
            out.tpot.append((last - first) / (tokens - 1))


async def live_load(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[Live, float]:
    out, queue = Live(), list(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=HEADERS) as client:

        async def worker() -> None:
            while queue:
                queue.pop()
                await one_live(client, url, max_tokens, out)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - start


def start_batch(url: str, lines: int, max_tokens: int) -> str:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    data = "".join(
        json.dumps(
            {
                "custom_id": f"b{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**body, "ignore_eos": True},
            }
        )
        + "\n"
        for i in range(lines)
    )
    f = httpx.post(
        f"{url}/v1/files",
        headers=HEADERS,
        files={"file": ("bench.jsonl", data.encode())},
        data={"purpose": "batch"},
    ).json()
    b = httpx.post(
        f"{url}/v1/batches",
        headers=HEADERS,
        json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ).json()
    return b["id"]


def batch_done(url: str, batch_id: str) -> tuple[str, int]:
    b = httpx.get(f"{url}/v1/batches/{batch_id}", headers=HEADERS).json()
    return b["status"], b["request_counts"]["completed"] + b["request_counts"]["failed"]


async def round_with_batch(url: str, args: argparse.Namespace) -> tuple[Live, int, int]:
    batch_id = start_batch(url, args.batch_lines, args.batch_max_tokens)
    while batch_done(url, batch_id)[1] < 1:  # the batch runs: its lines fill the batch cap
        await asyncio.sleep(0.2)
    before = batch_done(url, batch_id)[1]
    live, wall = await live_load(url, args.concurrency, args.live_requests, args.live_max_tokens)
    during = batch_done(url, batch_id)[1] - before
    await asyncio.sleep(wall)  # the same time without live load
    status, done = batch_done(url, batch_id)
    after = done - before - during
    httpx.post(f"{url}/v1/batches/{batch_id}/cancel", headers=HEADERS)
    while batch_done(url, batch_id)[0] not in ("cancelled", "completed"):
        await asyncio.sleep(0.2)
    return live, during, after


def row(name: str, live: Live) -> str:
    return (
        f"| {name} | {pct(live.ttft, 50) * 1e3:.1f} | {pct(live.ttft, 99) * 1e3:.1f} | "
        f"{pct(live.tpot, 50) * 1e3:.1f} | {pct(live.tpot, 99) * 1e3:.1f} | {live.errors} |"
    )


def main(argv: list[str] | None = None) -> int:
    global MODEL_NAME
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory or repo id; default: a fresh tiny checkpoint")
    parser.add_argument("--url", help="measure a server already running (with --scheduling-policy priority)")
    parser.add_argument("--model-name", default=MODEL_NAME, help="with --url: the model to ask for")
    parser.add_argument("--api-key", help="with --url: the key to send")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--live-requests", type=int, default=32)
    parser.add_argument("--live-max-tokens", type=int, default=48)
    parser.add_argument("--batch-lines", type=int, default=400)
    parser.add_argument("--batch-max-tokens", type=int, default=48)
    parser.add_argument("--batch-max-sequences", type=int, default=4)
    parser.add_argument("--batch-busy-max-sequences", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("engine_args", nargs="*", help="vLLM engine flags (after --)")
    args = parser.parse_args(argv)
    MODEL_NAME = args.model_name
    if args.api_key:
        HEADERS["Authorization"] = f"Bearer {args.api_key}"
    engine_args = args.engine_args or ["--enforce-eager", "--max-model-len", "512"]
    proc, url = None, args.url
    if url is None:
        work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
        model = args.model
        if model is None:
            from server.tiny_model import write_tiny_model

            model = str(write_tiny_model(work / "tiny"))
        proc, url = serve(model, work / "server.log", work / "batches", args, engine_args)
    alone, loaded = Live(), Live()
    progress = []
    try:
        asyncio.run(live_load(url, args.concurrency, args.concurrency * 2, 8))  # warm-up
        for _ in range(args.rounds):
            live, _ = asyncio.run(live_load(url, args.concurrency, args.live_requests, args.live_max_tokens))
            alone.ttft += live.ttft
            alone.tpot += live.tpot
            alone.errors += live.errors
            live, during, after = asyncio.run(round_with_batch(url, args))
            loaded.ttft += live.ttft
            loaded.tpot += live.tpot
            loaded.errors += live.errors
            progress.append((during, after))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"live load: {args.concurrency} streamed chats at a time, {args.live_requests} per round x {args.rounds}, "
          f"{args.live_max_tokens} tokens; batch: {args.batch_lines} lines x {args.batch_max_tokens} tokens, "
          f"--batch-max-sequences {args.batch_max_sequences} --batch-busy-max-sequences "
          f"{args.batch_busy_max_sequences}; engine {' '.join(engine_args)}")  # fmt: skip
    print()
    print("| live load | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) | errors |")
    print("|---|---|---|---|---|---|")
    print(row("alone", alone))
    print(row("with a batch running", loaded))
    ratios = [
        pct(loaded.ttft, 50) / pct(alone.ttft, 50),
        pct(loaded.ttft, 99) / pct(alone.ttft, 99),
        pct(loaded.tpot, 50) / pct(alone.tpot, 50),
        pct(loaded.tpot, 99) / pct(alone.tpot, 99),
    ]
    print("| **ratio** | " + " | ".join(f"**{r:.2f}**" for r in ratios) + " | |")
    print()
    for i, (during, after) in enumerate(progress):
        print(
            f"round {i + 1}: batch lines finished during the live load: {during}; in the same time after it: {after}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
