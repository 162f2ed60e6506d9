"""Benchmark (not a test): what a frequent /metrics scraper (an endpoint picker scrapes every 50 ms) costs the
streams of the same server, this checkout against another commit, each on the tiny checkpoint.

    python bench/bench_scrape.py --base d6d3704 [--streams 16 --tokens 256 --rounds 3 --every 0.05]

For each server, rounds alternate without and with the scraper; a round runs `--streams` concurrent streamed
completions. Printed per server and mode: the gap between streamed chunks (p50, p99, max, as the client sees
it), the scrape's latency, and the server's own event-loop lag (dsv2_event_loop_lag_seconds where the commit
has it: the share of 0.1 s timer samples that fired 25 ms or more late).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests import ports  # noqa: E402


def checkout(commit: str) -> Path:
    """The commit's files in a temporary directory (its `server` package is the one a server there imports)."""
    out = Path(tempfile.mkdtemp(prefix="dsv2-base-"))
    tar = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True).stdout
    tarfile.open(fileobj=BytesIO(tar)).extractall(out)
    return out


def serve(source: Path, model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    def spawn(port: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "server", "serve", "--model", str(model), "--port", str(port)]
        cmd += ["--enforce-eager", "--max-model-len", "1024", "--served-model-name", "m"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(source)}
        with open(log, "wb") as out:
            return subprocess.Popen(cmd, cwd=source, stdout=out, stderr=subprocess.STDOUT, env=env)

    def ready(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    proc, port = ports.launch(spawn, log, ready, timeout=600)
    return proc, f"http://127.0.0.1:{port}"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


LAG = re.compile(r'^dsv2_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)


def late_share(text: str) -> tuple[float, float]:
    """(samples 25 ms or more late, all samples) from the lag histogram; (0, 0) where the commit has none."""
    buckets = {float(le): float(v) for le, v in LAG.findall(text) if le != "+Inf"}
    total = float(re.search(r"^dsv2_event_loop_lag_seconds_count (\S+)$", text, re.M)[1]) if buckets else 0.0
    on_time = max((v for le, v in buckets.items() if le < 0.025), default=0.0)
    return total - on_time, total


async def one_round(url: str, streams: int, tokens: int, every: float | None) -> dict[str, list[float]]:
    gaps: list[float] = []
    scrapes: list[float] = []
    body = {"model": "m", "prompt": "the", "max_tokens": tokens, "min_tokens": tokens, "stream": True}
    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)
    ) as client:

        async def stream() -> None:
            last = None
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_raw():  # each network read: what the client got at once
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

        async def scraper(stop: asyncio.Event) -> None:
            while not stop.is_set():
                start = time.perf_counter()
                await client.get("/metrics")
                scrapes.append(time.perf_counter() - start)
                await asyncio.sleep(every)

        stop = asyncio.Event()
        scraping = asyncio.create_task(scraper(stop)) if every else None
        await asyncio.gather(*(stream() for _ in range(streams)))
        stop.set()
        if scraping:
            await scraping
    return {"gaps": gaps, "scrapes": scrapes}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="commit to compare with (e.g. the one before a change)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between scrapes")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: a fresh tiny one)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsv2-bench-scrape-"))
    model = args.model
    if model is None:
        model = work / "tiny"
        subprocess.run([sys.executable, "-m", "server", "tiny-model", str(model)], check=True, cwd=REPO)
    for name, source in ((f"base {args.base}", checkout(args.base)), ("this checkout", REPO)):
        proc, url = serve(source, model, work / f"{name.split()[0]}.log")
        try:
            results: dict[str, dict[str, list[float]]] = {"idle": {}, "scraped": {}}
            lag = {"idle": [0.0, 0.0], "scraped": [0.0, 0.0]}
            asyncio.run(one_round(url, args.streams, 16, None))  # warm-up
            for _ in range(args.rounds):
                for mode, every in (("idle", None), ("scraped", args.every)):
                    before = late_share(httpx.get(f"{url}/metrics").text)
                    r = asyncio.run(one_round(url, args.streams, args.tokens, every))
                    after = late_share(httpx.get(f"{url}/metrics").text)
                    lag[mode][0] += after[0] - before[0]
                    lag[mode][1] += after[1] - before[1]
                    for k, v in r.items():
                        results[mode].setdefault(k, []).extend(v)
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"== {name}")
        for mode, r in results.items():
            g, s = r["gaps"], r.get("scrapes", [])
            late, total = lag[mode]
            line = (
                f"  {mode:8s} chunk gap p50 {pct(g, 0.5) * 1e3:6.2f} ms  p99 {pct(g, 0.99) * 1e3:7.2f} ms  "
            )
            line += f"max {max(g) * 1e3:7.1f} ms"
            if s:
                line += f"  | scrape p50 {pct(s, 0.5) * 1e3:5.1f} ms p99 {pct(s, 0.99) * 1e3:6.1f} ms (n={len(s)})"
            if total:
                line += f"  | loop lag >= 25 ms: {late:.0f}/{total:.0f} samples"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
