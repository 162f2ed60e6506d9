"""render.py's fast SSE path against a plain JSON rendering of the same chunks, over randomised engine streams:
byte for byte, and every chunk valid against OpenAI's published schema; the same streams coalesced (as vLLM merges
a request's outputs under --stream-interval, or when its consumer falls behind) give a client the same text,
logprobs and tool calls in fewer events; and SSEResponse sends every event once, in order, whether the connection
takes data or not. No engine, no HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from server.gateway import connections, render, tools
from server.gateway.admission import Slot, SlowClient
from server.gateway.engine import ChoiceDelta, EngineStep, TokenLogprob
from server.gateway.metrics import GatewayMetrics, RequestTimer
from server.gateway.stream import Stream, Usage
from server.gateway.tenants import ANONYMOUS
from server.gateway.tracing import RequestTrace
from tests import openai_schema

ENV = render.Envelope('chatcmpl-x"y', 1_700_000_000, "tiny/model")
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
LOGPROB = st.builds(
    TokenLogprob,
    token=TEXT,
    logprob=st.floats(min_value=-9999, max_value=0, allow_nan=False),
    top=st.lists(st.tuples(TEXT, st.floats(min_value=-9999, max_value=0, allow_nan=False)), max_size=2),
)


@st.composite
def streams(draw) -> tuple[int, bool, list[EngineStep]]:
    n = draw(st.integers(1, 3))
    with_logprobs = draw(st.booleans())
    finish = [draw(st.sampled_from(["stop", "length", "repetition"])) for _ in range(n)]
    lengths = [draw(st.integers(0, 5)) for _ in range(n)]
    steps = []
    for k in range(max(lengths) + 1):
        choices = []
        for i in range(n):
            if k > lengths[i]:
                continue
            text = draw(TEXT)
            lps = draw(st.lists(LOGPROB, min_size=1, max_size=2)) if with_logprobs else None
            choices.append(
                ChoiceDelta(
                    i, text, len(lps) if lps else int(bool(text)), lps, finish[i] if k == lengths[i] else None
                )
            )
        steps.append(EngineStep(7, choices, k == max(lengths)))
    return n, draw(st.booleans()), steps


def reference_sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def run(events) -> list[bytes]:
    async def consume() -> list[bytes]:
        return [e async for e in events]

    return asyncio.run(consume())


async def aiter_steps(steps):
    for step in steps:
        yield step


def stream_of(steps, n: int) -> Stream:
    """The one stream loop over `steps` of one 7-token prompt, as serving builds it for a stream."""
    slot = Slot("chatcmpl-x", n, ["chatcmpl-x"], ANONYMOUS)
    return Stream(aiter_steps(steps), n, Usage(7), timer(), RequestTrace(None, "test", {}, {}), slot)


def mapped(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def chat_reference(n: int, include_usage: bool, steps: list[EngineStep]) -> list[bytes]:
    head = {"id": ENV.id, "object": "chat.completion.chunk", "created": ENV.created, "model": ENV.model}
    tail = {"usage": None} if include_usage else {}
    out = [
        reference_sse(
            {
                **head,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                **tail,
            }
        )
        for i in range(n)
    ]
    tokens = 0
    for step in steps:
        for c in step.choices:
            tokens += c.num_tokens
            if not c.text and c.finish_reason is None and not c.logprobs:
                continue
            choice = {
                "index": c.index,
                "delta": {"content": c.text} if c.text else {},
                "logprobs": render.chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": mapped(c.finish_reason),
            }
            out.append(reference_sse({**head, "choices": [choice], **tail}))
    if include_usage:
        usage = {
            "completion_tokens": tokens,
            "prompt_tokens": 7,
            "total_tokens": tokens + 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        out.append(reference_sse({**head, "choices": [], "usage": usage}))
    return [*out, b"data: [DONE]\n\n"]


def completion_reference(n: int, include_usage: bool, steps: list[EngineStep]) -> list[bytes]:
    head = {"id": ENV.id, "object": "text_completion", "created": ENV.created, "model": ENV.model}
    tail = {"usage": None} if include_usage else {}
    out, tokens, offsets = [], 0, {}
    for step in steps:
        for c in step.choices:
            tokens += c.num_tokens
            lp = None
            if c.logprobs is not None:
                lp, offsets[c.index] = render.completion_logprobs(c.logprobs, offsets.get(c.index, 0))
            if not c.text and c.finish_reason is None and lp is None:
                continue
            choice = {
                "index": c.index,
                "text": c.text,
                "logprobs": lp,
                "finish_reason": mapped(c.finish_reason),
            }
            out.append(reference_sse({**head, "choices": [choice], **tail}))
    if include_usage:
        usage = {
            "completion_tokens": tokens,
            "prompt_tokens": 7,
            "total_tokens": tokens + 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        out.append(reference_sse({**head, "choices": [], "usage": usage}))
    return [*out, b"data: [DONE]\n\n"]


def timer() -> RequestTimer:
    return RequestTimer(GatewayMetrics(), "/v1/chat/completions")


@settings(max_examples=300, deadline=None)
@given(streams())
def test_chat_fast_path_is_byte_identical(case):
    n, include_usage, steps = case
    fast = run(render.chat_events(stream_of(steps, n), ENV, n, include_usage))
    # Exact, logprobs included: both sides serialise the same Python floats with json's repr.
    assert b"".join(fast) == b"".join(chat_reference(n, include_usage, steps))


@settings(max_examples=300, deadline=None)
@given(streams())
def test_completion_fast_path_is_byte_identical(case):
    n, include_usage, steps = case
    fast = run(render.completion_events(stream_of(steps, n), ENV, n, None, include_usage))
    # Exact, logprobs included: both sides serialise the same Python floats with json's repr.
    assert b"".join(fast) == b"".join(completion_reference(n, include_usage, steps))


@settings(max_examples=60, deadline=None)
@given(streams())
def test_every_chunk_matches_openai_schema(case):
    openai_schema.require_spec()
    n, include_usage, steps = case
    wire = b"".join(run(render.chat_events(stream_of(steps, n), ENV, n, include_usage)))
    events = wire.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for event in events[:-2]:
        openai_schema.chat_chunk(json.loads(event[len("data: ") :]))


# --- coalesced streams (--stream-interval, or a stream that fell behind): the same text, fewer events ------------


def coalesce(steps: list[EngineStep], cuts: set[int]) -> list[EngineStep]:
    """`steps` merged as vLLM merges a request's outputs when it holds them back (its RequestOutput.add with
    aggregate=True: --stream-interval, or a consumer that fell behind): per choice, text and logprobs
    concatenated, tokens summed, the last finish; one merged step ends after each index in `cuts` and at the end."""
    out: list[EngineStep] = []
    pending: EngineStep | None = None
    for k, step in enumerate(steps):
        if pending is None:
            pending = EngineStep(step.prompt_tokens, [], False)
        for c in step.choices:
            prev = next((p for p in pending.choices if p.index == c.index), None)
            if prev is None:
                pending.choices.append(replace(c, logprobs=None if c.logprobs is None else list(c.logprobs)))
                continue
            prev.text += c.text
            prev.num_tokens += c.num_tokens
            if c.logprobs:
                prev.logprobs = [*(prev.logprobs or []), *c.logprobs]
            prev.finish_reason, prev.stop_sequence = c.finish_reason, c.stop_sequence
        pending.finished |= step.finished
        if k in cuts or k == len(steps) - 1:
            out.append(pending)
            pending = None
    return out


def client_view(wire: bytes, text_key: str) -> tuple[dict, dict | None, int]:
    """What a client that concatenates deltas ends with: per choice its text, logprobs, tool calls and finish
    reason; the usage; and how many events carried a choice."""
    choices: dict = {}
    usage, events = None, 0
    for event in wire.decode().split("\n\n")[:-1]:
        data = event[len("data: ") :]
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk.get("usage") and not chunk["choices"]:
            usage = chunk["usage"]
        for c in chunk["choices"]:
            events += 1
            view = choices.setdefault(c["index"], {"text": "", "logprobs": {}, "calls": [], "finish": None})
            delta = c["delta"] if text_key == "content" else c
            view["text"] += delta.get(text_key) or ""
            for call in delta.get("tool_calls") or []:
                if "id" in call:
                    view["calls"].append([call["function"]["name"], ""])
                view["calls"][call["index"]][1] += call["function"]["arguments"]
            for key, values in (c["logprobs"] or {}).items():
                if isinstance(values, list):
                    view["logprobs"].setdefault(key, []).extend(values)
            if c["finish_reason"] is not None:
                view["finish"] = c["finish_reason"]
    return choices, usage, events


@settings(max_examples=200, deadline=None)
@given(streams(), st.sets(st.integers(0, 6)))
def test_coalesced_steps_stream_the_same_text(case, cuts):
    n, include_usage, steps = case
    merged = coalesce(steps, cuts)
    for events, key in (
        (lambda s: render.chat_events(stream_of(s, n), ENV, n, include_usage), "content"),
        (lambda s: render.completion_events(stream_of(s, n), ENV, n, None, include_usage), "text"),
    ):
        plain, plain_usage, plain_events = client_view(b"".join(run(events(steps))), key)
        joined, joined_usage, joined_events = client_view(b"".join(run(events(merged))), key)
        assert joined == plain and joined_usage == plain_usage
        assert joined_events <= plain_events


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(TEXT, st.builds(lambda city: tools.render_call("f", json.dumps({"city": city})), TEXT)),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(1, 6), min_size=1, max_size=40),
    st.sets(st.integers(0, 40)),
)
def test_coalesced_tool_calls_are_the_same_calls(parts, sizes, cuts):
    text = "".join(parts)
    pieces, at = [], 0
    for size in sizes * (len(text) // len(sizes) + 1):
        if at >= len(text):
            break
        pieces.append(text[at : at + size])
        at += size
    pieces = pieces or [""]
    last = len(pieces) - 1
    steps = [
        EngineStep(7, [ChoiceDelta(0, p, 1, None, "stop" if k == last else None)], k == last)
        for k, p in enumerate(pieces)
    ]

    def wire(s: list[EngineStep]) -> bytes:
        slot = Slot("chatcmpl-x", 1, ["chatcmpl-x"], ANONYMOUS)
        stream = Stream(aiter_steps(s), 1, Usage(7), timer(), RequestTrace(None, "test", {}, {}), slot, True)
        return b"".join(run(render.chat_events(stream, ENV, 1, True)))

    assert client_view(wire(coalesce(steps, cuts)), "content")[:2] == client_view(wire(steps), "content")[:2]


# --- SSEResponse: events sent from the rendering task while the connection takes data, else through its outbox ---


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=16), max_size=30),
    st.lists(st.booleans(), min_size=1, max_size=8),
    st.integers(0, 3),
    st.booleans(),
)
def test_sse_response_sends_every_event_once_in_order(events, writable, stall, direct):
    """Whatever the connection does (takes data at once, or is paused so that a send waits `stall` turns of the
    loop), and whether it offers to write events straight (connections.WRITE, `direct`): the same bytes in order,
    headers first and the end last, one send or write at a time, the owner closed."""
    pattern = itertools.cycle(writable)
    paused, in_flight, sent, closed = [False], [False], [], []

    async def body():
        for event in events:
            await asyncio.sleep(0)
            yield event

    def takes_data() -> bool:
        paused[0] = not next(pattern)
        return not paused[0]

    async def send(message):
        assert not in_flight[0], "two sends at once"
        in_flight[0] = True
        for _ in range(stall if paused[0] else 0):
            await asyncio.sleep(0)
        sent.append(message)
        in_flight[0] = False

    def write(chunk: bytes) -> bool:
        assert not in_flight[0], "a write during a send"
        if not takes_data():
            return False
        sent.append({"type": "http.response.body", "body": chunk, "more_body": True})
        return True

    async def receive():
        await asyncio.Future()  # the client stays

    owner = contextlib.AsyncExitStack()
    owner.callback(closed.append, True)
    response = render.SSEResponse(body(), owner, 30.0)
    extensions = {connections.WRITABLE: takes_data, **({connections.WRITE: write} if direct else {})}
    asyncio.run(response({"type": "http", "extensions": extensions}, receive, send))
    assert sent[0]["type"] == "http.response.start"
    assert [m["more_body"] for m in sent[1:]] == [True] * (len(sent) - 2) + [False]
    assert b"".join(m["body"] for m in sent[1:]) == b"".join(events)
    assert closed == [True]


def test_a_send_not_taken_within_the_timeout_ends_the_stream_as_a_slow_client():
    left, dropped, ended = asyncio.Event(), [], []

    async def body():
        while True:
            await asyncio.sleep(0.01)
            yield b"data: x\n\n"

    async def send(message):
        if message["type"] == "http.response.body":
            await asyncio.Future()  # the client never takes it

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    def drop():
        dropped.append(True)
        left.set()

    @contextlib.asynccontextmanager
    async def owner():
        try:
            yield
        except BaseException as exc:
            ended.append(type(exc))
            raise

    async def serve() -> float:
        start = time.monotonic()
        response = render.SSEResponse(body(), owner(), 0.2)
        extensions = {connections.DROP_CONNECTION: drop, connections.WRITABLE: lambda: True}
        await response({"type": "http", "extensions": extensions}, receive, send)
        return time.monotonic() - start

    took = asyncio.run(serve())
    assert 0.2 <= took < 2 and dropped == [True] and ended == [SlowClient]
