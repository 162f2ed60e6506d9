"""Micro-benchmark (not a test): our per-token code on a plain streamed chat, from engine steps to SSE bytes,
with no engine and no HTTP; this checkout against another commit's gateway, alternating in fresh processes.

    python bench/bench_stream.py --base 7d5ce34 [--tokens 20000 --rounds 4] [--sse]

Prints µs per token of each and the ratio base / this checkout (>= 1.00: this checkout is at least as cheap).
The steps pass through an admission slot as in serving; commits from before the stream loop (stream.py) are
driven through their slot's track() and their own render.chat_events. With --sse the events also go through
render.SSEResponse to an ASGI send that takes everything at once (the cost of the response's own machinery).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from server.gateway import render
from server.gateway.engine import ChoiceDelta, EngineStep
from server.gateway.metrics import GatewayMetrics, RequestTimer

N = int(sys.argv[2])
SSE = sys.argv[3] == "sse"  # through the SSE response too, to a socket that takes everything


async def steps():
    for k in range(N):
        yield EngineStep(7, [ChoiceDelta(0, " word", 1, None, "stop" if k == N - 1 else None)], k == N - 1)


def slot():  # an admission slot as each version builds it (the steps pass through it, as in serving)
    import inspect

    from server.gateway.admission import Slot
    from server.gateway.tenants import ANONYMOUS

    extra = [None] * (len(inspect.signature(Slot).parameters) - 4)  # older slots also took the request timer
    return Slot("x", 1, ["x"], ANONYMOUS, *extra)


async def run() -> float:
    env = render.Envelope("chatcmpl-x", 1, "m")
    timer = RequestTimer(GatewayMetrics(), "/v1/chat/completions")
    s = slot()
    try:
        from server.gateway.stream import Stream, Usage
        from server.gateway.tracing import RequestTrace
    except ImportError:  # before the stream loop: the slot tracked the steps, render consumed them itself
        events = render.chat_events(s.track(steps(), "x"), env, 1, True, timer)
    else:
        stream = Stream(steps(), 1, Usage(7), timer, RequestTrace(None, "bench", {}, {}), s)
        events = render.chat_events(stream, env, 1, True)
    start = time.perf_counter()
    if SSE:
        await through_response(events)
    else:
        async for _ in events:
            pass
    return (time.perf_counter() - start) / N * 1e6


async def through_response(events) -> None:
    # The events sent by the SSE response to an ASGI send that takes everything at once.
    import contextlib
    import inspect

    args = [events, contextlib.AsyncExitStack()]
    if "send_timeout" in inspect.signature(render.SSEResponse).parameters:
        args.append(30.0)
    response = render.SSEResponse(*args)

    async def receive():
        await asyncio.Future()  # the client never leaves

    async def send(message):
        pass

    await response({"type": "http", "extensions": {}}, receive, send)


print(min(asyncio.run(run()) for _ in range(3)))
"""


def measure(root: Path, tokens: int, sse: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(root), str(tokens), "sse" if sse else "events"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the git commit to compare with")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--sse",
        action="store_true",
        help="also send the events through the SSE response (render.SSEResponse)",
    )
    a = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    archive = subprocess.run(["git", "archive", a.base, "server"], cwd=REPO, capture_output=True, check=True)
    tarfile.open(fileobj=BytesIO(archive.stdout)).extractall(base, filter="data")
    results: dict[str, list[float]] = {"base": [], "this": []}
    for r in range(a.rounds):
        order = [("base", base), ("this", REPO)] if r % 2 == 0 else [("this", REPO), ("base", base)]
        for name, root in order:
            results[name].append(measure(root, a.tokens, a.sse))
    b, t = min(results["base"]), min(results["this"])
    print(f"{a.base}: {b:.2f} us/token   this checkout: {t:.2f} us/token   base/this {b / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
