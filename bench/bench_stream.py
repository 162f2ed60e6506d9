"""Micro-benchmark (not a test): our per-token code on a plain streamed chat, from engine steps to SSE bytes,
with no engine and no HTTP; this checkout against another commit's gateway (or a directory holding a `server/`
tree), alternating in fresh processes.

    python bench/bench_stream.py --base 7d5ce34 [--tokens 20000 --rounds 4] [--sse]
    python bench/bench_stream.py --base 7d5ce34 --pipeline [--streams 32 --tokens 128 --rounds 6]

Prints µs per token of each and the ratio base / this checkout (>= 1.00: this checkout is at least as cheap).
The steps pass through an admission slot as in serving; commits from before the stream loop (stream.py) are
driven through their slot's track() and their own render.chat_events. With --sse the events also go through
render.SSEResponse to an ASGI send that takes everything at once (the cost of the response's own machinery).

--pipeline measures what the plain modes cannot see: the tasks that wait. `--streams` streams at once, on uvloop,
each fed by vLLM's own RequestOutputCollector as AsyncLLM's output handler feeds it (one RequestOutput per stream
per engine step, the loop left idle between steps), through VLLMEngine.generate's conversion, the stream loop, the
chat dialect and render.SSEResponse, to an ASGI send that writes to a null transport on a connection that takes
data (connections.WRITABLE). Process CPU time per token: each wake of a waiting task, each timer and each send
counts, vLLM's collector and the RequestOutputs included (the same for both sides).
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


PIPELINE = r"""
import asyncio, contextlib, sys, time
sys.path.insert(0, sys.argv[1])
import uvloop
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.output_processor import RequestOutputCollector

from server.gateway import render
from server.gateway.admission import Slot
from server.gateway.engine import EngineProgress, SamplingOptions, VLLMEngine
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.stream import Stream, Usage
from server.gateway.tenants import ANONYMOUS
from server.gateway.tracing import RequestTrace

STREAMS, TOKENS, ROUNDS = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
PROMPT = [1, 2, 3, 4, 5, 6, 7]


class Collectors:  # AsyncLLM as VLLMEngine.generate sees it: its generate() loop over the request's collector
    errored = False

    def __init__(self):
        self.queues = {}

    def get_num_unfinished_requests(self):
        return len(self.queues)

    async def generate(self, prompt, params, request_id, lora_request=None, priority=0):
        q = self.queues[request_id] = RequestOutputCollector(RequestOutputKind.DELTA, request_id)
        finished = False
        while not finished:
            out = q.get_nowait() or await q.get()
            finished = out.finished
            yield out
        del self.queues[request_id]


class NullTransport:
    def write(self, data):
        pass


async def one(engine, metrics, rid):
    slot = Slot(rid, 1, [rid], ANONYMOUS)
    steps = engine.generate(PROMPT, SamplingOptions(max_tokens=TOKENS, ignore_eos=True), rid)
    timer = RequestTimer(metrics, "/v1/chat/completions")
    stream = Stream(steps, 1, Usage(len(PROMPT)), timer, RequestTrace(None, "bench", {}, {}), slot)
    await stream.start()
    events = render.chat_events(stream, render.Envelope("chatcmpl-" + rid, 1, "m"), 1, True)
    transport = NullTransport()

    async def receive():
        await asyncio.Future()  # the client never leaves

    async def send(message):  # uvicorn's: the body written to the transport
        if message["type"] == "http.response.body":
            transport.write(message["body"])

    response = render.SSEResponse(events, contextlib.AsyncExitStack(), 30.0)
    await response({"type": "http", "extensions": {"dsv2.writable": lambda: True}}, receive, send)


async def round_(metrics) -> float:
    llm = Collectors()
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM behind it: the fields generate() reads
    engine._llm, engine.progress, engine._lora_requests = llm, EngineProgress(), {}
    rids = [f"r{i}" for i in range(STREAMS)]
    tasks = [asyncio.ensure_future(one(engine, metrics, rid)) for rid in rids]
    await asyncio.sleep(0.01)
    start = time.process_time()
    for k in range(TOKENS):
        last = k == TOKENS - 1
        for rid in rids:  # one engine step: a RequestOutput per stream, as the output handler puts them
            choice = CompletionOutput(0, " word", [11], None, None, finish_reason="length" if last else None)
            llm.queues[rid].put(RequestOutput(rid, None, PROMPT, None, [choice], last))
        await asyncio.sleep(0.002)  # the next step comes later: every stream has rendered and sent by then
    await asyncio.gather(*tasks)
    return (time.process_time() - start) / (STREAMS * TOKENS) * 1e6


async def main():
    metrics = GatewayMetrics()
    await round_(metrics)  # warm-up
    print(min([await round_(metrics) for _ in range(ROUNDS)]))


uvloop.run(main())
"""


def measure(root: Path, tokens: int, sse: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(root), str(tokens), "sse" if sse else "events"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def measure_pipeline(root: Path, streams: int, tokens: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PIPELINE, str(root), str(streams), str(tokens), "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def checkout(base: str) -> Path:
    """A directory holding `server/` of `base`: the directory itself, or the commit's tree extracted."""
    if (Path(base) / "server").is_dir():
        return Path(base)
    root = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    archive = subprocess.run(["git", "archive", base, "server"], cwd=REPO, capture_output=True, check=True)
    tarfile.open(fileobj=BytesIO(archive.stdout)).extractall(root, filter="data")
    return root


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", required=True, help="the git commit to compare with, or a directory holding a server/ tree"
    )
    parser.add_argument("--tokens", type=int, help="tokens per stream (default 20000; 128 with --pipeline)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--sse",
        action="store_true",
        help="also send the events through the SSE response (render.SSEResponse)",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="many streams at once, fed by vLLM's output collector, through SSEResponse (see above)",
    )
    parser.add_argument("--streams", type=int, default=32, help="streams at once with --pipeline")
    a = parser.parse_args()
    tokens = a.tokens or (128 if a.pipeline else 20000)
    base = checkout(a.base)
    results: dict[str, list[float]] = {"base": [], "this": []}
    for r in range(a.rounds):
        order = [("base", base), ("this", REPO)] if r % 2 == 0 else [("this", REPO), ("base", base)]
        for name, root in order:
            if a.pipeline:
                results[name].append(measure_pipeline(root, a.streams, tokens))
            else:
                results[name].append(measure(root, tokens, a.sse))
    b, t = min(results["base"]), min(results["this"])
    print(f"{a.base}: {b:.2f} us/token   this checkout: {t:.2f} us/token   base/this {b / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
