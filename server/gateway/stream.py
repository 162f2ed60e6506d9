"""The one loop over a request's engine steps, for every API (chat, completions, Responses, Messages), streamed or
not. It counts the tokens (per request: prompt, generated, found in the prefix cache), maps finish reasons, splits
tool calls from text (one CallParser per choice), times the tokens, hands the engine's timings to the trace, and
turns any failure into the one error the client gets. Each API only formats what it yields: render.py (chat,
completions), responses.py, anthropic.py.

    stream = Stream(steps, n, usage, timer, trace, slot, with_tools)
    async for deltas in stream:     # one list per engine step: what each choice produced
        ...                         # format them
    if stream.failure: ...          # the error frame; otherwise the ending, with `usage`
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.gateway import tools
from server.gateway.admission import Slot
from server.gateway.engine import (
    ChoiceDelta,
    EngineDead,
    EngineFailed,
    EngineRejected,
    EngineStep,
    RequestAborted,
    TokenLogprob,
)
from server.gateway.errors import (
    APIError,
    DeadlineExceeded,
    deadline_exceeded,
    engine_failure,
    engine_unavailable,
    shutting_down,
)
from server.gateway.metrics import RequestTimer
from server.gateway.tracing import RequestTrace

log = logging.getLogger("dsv2.stream")


def finish_reason(reason: str | None, calls: int = 0) -> str | None:
    """vLLM's finish reasons -> OpenAI's: "repetition" (vLLM's hallucination guard) ends like a stop, and a stop
    after a tool call is "tool_calls" (a cut by max_tokens stays "length")."""
    if reason is None or reason == "length":
        return reason
    return "tool_calls" if calls else "stop"


def failure(exc: BaseException, timer: RequestTimer, trace: RequestTrace) -> APIError:
    """The error a request that failed after admission ends with (an event in a stream, else the body); counted
    in the metrics and on the request's span."""

    def failed(reason: str) -> None:
        timer.failed(reason)
        trace.set("dsv2.failure", reason)

    if isinstance(exc, RequestAborted):
        failed("aborted")
        return shutting_down()
    if isinstance(exc, EngineDead):
        failed("engine_dead")
        return engine_unavailable()
    if isinstance(exc, DeadlineExceeded):
        failed("deadline")
        return deadline_exceeded(exc)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineRejected):  # vLLM refused the request as invalid: the client's 400
        return APIError(str(exc), param=exc.param)
    failed("engine_error")
    if not isinstance(exc, EngineFailed):
        log.error("request failed", exc_info=exc)
    else:
        log.error("engine failed the request: %s", exc)
    return engine_failure(exc)


@dataclass(slots=True)
class Usage:
    """A request's tokens so far: its prompts', those generated, and the prompt tokens found in the prefix cache.
    Also what its key is charged when it ends (serving settles it)."""

    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class Delta:
    """What one choice produced in one engine step."""

    index: int  # the choice's index in the response: prompt index * n + choice
    text: str  # new text; with tools, "" and the text is in `events`
    events: list[tools.Event] | None  # with tools: content and tool-call events, in order
    logprobs: list[TokenLogprob] | None
    finish: str | None  # OpenAI's finish reason once the choice ended: "stop", "length" or "tool_calls"
    stop: str | None  # the stop string that ended it, if one did


class Stream:
    """A request's engine steps (as generate_many yields them, each marked with its prompt) as lists of Deltas;
    see the module's docstring. `buffered`: a non-streamed response, timed by the engine's first-token timestamp
    instead of deliveries."""

    def __init__(
        self,
        steps: AsyncIterator[EngineStep],
        n: int,
        usage: Usage,
        timer: RequestTimer,
        trace: RequestTrace,
        slot: Slot,
        with_tools: bool = False,
        buffered: bool = False,
    ) -> None:
        self.steps = steps
        self.slot = slot
        self.n = n
        self.usage = usage
        self.timer = timer
        self.trace = trace
        self.parsers: dict[int, tools.CallParser] | None = {} if with_tools else None
        self.buffered = buffered
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}  # per prompt, when asked (echo)
        self.failure: APIError | None = None
        self._first: EngineStep | None = None  # read by start(), handled first by the loop

    async def start(self) -> None:
        """Wait for the engine's first step, before a stream's headers are sent: a failure there (the engine
        refused or failed the request, a drain aborted it) is raised as the plain HTTP error it becomes."""
        try:
            self._first = await anext(self.steps, None)
        except Exception as exc:
            self.slot.fail(exc)
            raise failure(exc, self.timer, self.trace) from exc

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        """The loop itself: one async generator between the engine's steps and the dialect (the hot path)."""
        try:
            if self._first is not None:
                first, self._first = self._first, None
                yield self._step(first)
            async for step in self.steps:
                yield self._step(step)
        except Exception as exc:  # drain abort, deadline, engine failure: the one error the client gets
            self.slot.fail(exc)
            self.failure = failure(exc, self.timer, self.trace)
            return
        usage, trace = self.usage, self.trace
        self.timer.done(usage.prompt_tokens, usage.completion_tokens)
        trace.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
        trace.set("gen_ai.usage.output_tokens", usage.completion_tokens)

    def _step(self, step: EngineStep) -> list[Delta]:
        """One engine step: its counts, timings and each choice's Delta."""
        usage, n, p = self.usage, self.n, step.prompt
        if step.finished:
            self.slot.finished(p)
        if step.cached_tokens:
            usage.cached_tokens += step.cached_tokens
        if step.timings is not None:
            self.trace.engine(step.timings)
        if step.prompt_logprobs is not None:
            self.prompt_logprobs.setdefault(p, step.prompt_logprobs)
        produced = 0
        deltas = []
        for c in step.choices:
            if not 0 <= c.index < n:
                raise EngineFailed(f"the engine answered with choice {c.index} of {n}")
            produced += c.num_tokens
            if self.parsers is None:  # the per-token path of plain text: no call besides the Delta itself
                finish = c.finish_reason and finish_reason(c.finish_reason)
                deltas.append(Delta(p * n + c.index, c.text, None, c.logprobs, finish, c.stop_sequence))
            else:
                deltas.append(self._tool_delta(p * n + c.index, c))
        usage.completion_tokens += produced
        if self.buffered:
            if produced or step.first_token_time is not None:
                self.timer.first_token_at(step.first_token_time)
        elif produced:
            self.timer.tokens()
        return deltas

    def _tool_delta(self, index: int, c: ChoiceDelta) -> Delta:
        """With tools: the choice's text through its CallParser, as content and tool-call events."""
        parser = self.parsers.get(index)
        if parser is None:
            parser = self.parsers[index] = tools.CallParser()
        events = parser.feed(c.text)
        if c.finish_reason is not None:
            events += parser.close()
        finish = finish_reason(c.finish_reason, parser.calls)
        return Delta(index, "", events, c.logprobs, finish, c.stop_sequence)


@dataclass
class Answer:
    """One choice's whole output, for a non-streamed body: its text and tool calls split once, by the loop."""

    text: str = ""
    calls: list[tools.ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish: str = "stop"
    stop: str | None = None

    def add(self, d: Delta) -> None:
        if d.events is None:
            self.text += d.text
        for e in d.events or ():
            if e.kind == "content":
                self.text += e.text
            elif e.kind == "call":
                self.calls.append(tools.ToolCall(e.call_id, e.name))
            else:
                self.calls[-1].arguments += e.text
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        if d.finish is not None:
            self.finish, self.stop = d.finish, d.stop


async def collect(stream: Stream, choices: int) -> list[Answer]:
    """Every choice's whole output; a failure is raised as the APIError the client gets."""
    answers = [Answer() for _ in range(choices)]
    async for deltas in stream:
        for d in deltas:
            answers[d.index].add(d)
    if stream.failure is not None:
        raise stream.failure
    return answers
