"""render.py's fast SSE path against a plain JSON rendering of the same chunks, over randomised engine streams:
byte for byte, and every chunk valid against OpenAI's published schema. No engine, no HTTP."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from server.gateway import render
from server.gateway.admission import Slot
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
