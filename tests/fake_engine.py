"""FakeEngine: a stand-in engine for HTTP unit tests ONLY (auth, limits, error shapes, SSE framing, drain).

It implements server.gateway.engine.Engine without vLLM: each choice "generates" the words of a fixed text,
one word per step, with a configurable delay. Behaviour tests use the real engine (test_gateway_engine.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.gateway.engine import ChoiceDelta, EngineDead, EngineStep, SamplingOptions, TokenLogprob

WORDS = ["Hello", " from", " the", " fake", " engine", "."]


class FakeEngine:
    def __init__(self, max_model_len: int = 256, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.max_model_len = max_model_len
        self.delay = delay
        self.fail_after = fail_after
        self.dead = False
        self.started = False
        self.aborted: list[str] = []
        self.running: set[str] = set()

    async def start(self) -> None:
        self.started = True

    @property
    def is_dead(self) -> bool:
        return self.dead

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDead("fake engine marked dead")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    async def shutdown(self) -> None:
        self.started = False

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]:
        if self.dead:
            raise EngineDead("fake engine marked dead")
        self.running.add(request_id)
        try:
            steps = min(options.max_tokens, len(WORDS))
            finish = "stop" if options.max_tokens >= len(WORDS) else "length"
            texts = [""] * options.n
            for k in range(steps):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and k >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                last = k == steps - 1
                choices = []
                for i in range(options.n):
                    lp = None
                    if options.logprobs is not None:
                        lp = [TokenLogprob(WORDS[k], -0.5, [(WORDS[k], -0.5)][: options.logprobs])]
                    choices.append(ChoiceDelta(i, WORDS[k], 1, lp, finish if last else None))
                    texts[i] += WORDS[k]
                if options.stream or last:
                    if not options.stream:  # final-only: the whole text at once
                        choices = [
                            ChoiceDelta(i, texts[i], steps, _all_lp(options, steps), finish)
                            for i in range(options.n)
                        ]
                    yield EngineStep(len(prompt_token_ids), choices, last)
        finally:
            self.running.discard(request_id)


def _all_lp(options: SamplingOptions, steps: int) -> list[TokenLogprob] | None:
    if options.logprobs is None:
        return None
    return [TokenLogprob(WORDS[k], -0.5, [(WORDS[k], -0.5)][: options.logprobs]) for k in range(steps)]
