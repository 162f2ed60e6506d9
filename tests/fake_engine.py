"""FakeEngine: a stand-in engine for HTTP unit tests ONLY (auth, limits, error shapes, SSE framing, admission).

It implements server.gateway.engine.Engine without vLLM: each choice "generates" the words of a fixed text,
one word per step, with a configurable delay; with `prompt_words`, the words are the prompt's token ids (" t12"),
so that an answer mixed up with another prompt's shows. abort() ends a running generation the way vLLM does (the
generation stops with RequestAborted). `cached_tokens` reports that many prompt tokens as prefix-cache hits, on
the first step as vLLM does. Behaviour with the real engine is tested in test_gateway_engine.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from server.gateway.engine import (
    ChoiceDelta,
    EngineDead,
    EngineFailed,
    EngineProgress,
    EngineRejected,
    EngineStep,
    EngineTimings,
    RequestAborted,
    SamplingOptions,
    TokenLogprob,
)

WORDS = ["Hello", " from", " the", " fake", " engine", "."]


class FakeEngine:
    def __init__(
        self,
        max_model_len: int = 256,
        delay: float = 0.0,
        fail_after: int | None = None,
        error_finish: bool = False,
        words: list[str] | None = None,
        prompt_words: bool = False,
        cached_tokens: int = 0,
    ) -> None:
        self.max_model_len = max_model_len
        self.delay = delay
        self.fail_after = fail_after
        self.error_finish = error_finish  # end every request as vLLM's finish_reason "error" does
        self.words = words or WORDS
        self.prompt_words = prompt_words
        self.cached_tokens = cached_tokens
        self.dead = False
        self.started = False
        self.progress = EngineProgress()
        self.priority_scheduling = False
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.working: set[str] = set()  # running and not waiting for their consumer: see pending_requests
        self.generated: list[str] = []  # request ids, in order
        self.options: list[SamplingOptions] = []  # what each request asked of the sampler
        self.adapters: dict[str, str] = {}  # LoRA adapters, as the Engine protocol keeps them

    async def start(self, startup=None) -> None:
        self.started = True

    @property
    def is_dead(self) -> bool:
        return self.dead

    @property
    def pending_requests(self) -> int:
        """Requests the fake is working on. It makes a step only when its consumer asks for one, so a request
        waiting at a step its consumer has not taken is not pending: vLLM would have run ahead with it."""
        return len(self.working)

    def _work(self, request_id: str) -> None:
        if not self.working:
            self.progress.busy_since = time.monotonic()
        self.working.add(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDead("fake engine marked dead")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)
        self.working.discard(request_id)

    async def shutdown(self) -> None:
        self.started = False

    async def load_adapter(self, name: str, path: str) -> None:
        """Records the adapter; a path containing "broken" fails to load, as a bad adapter does in vLLM."""
        if "broken" in path:
            raise EngineRejected(f"LoRA adapter {name!r} ({path}) did not load: fake failure", "lora_path")
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]:
        if self.dead:
            raise EngineDead("fake engine marked dead")
        if options.temperature < 0:  # as vLLM refuses what its own checks do not allow: a client error
            raise EngineRejected("temperature must be non-negative", "temperature")
        self.running.add(request_id)
        self._work(request_id)
        self.generated.append(request_id)
        self.options.append(options)
        words = [f" t{t}" for t in prompt_token_ids] if self.prompt_words else self.words
        queued = time.time()
        cached = min(self.cached_tokens, len(prompt_token_ids))
        first_token = None
        try:
            steps = min(options.max_tokens, len(words))
            finish = "stop" if options.max_tokens >= len(words) else "length"
            texts = [""] * options.n
            for k in range(steps):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if request_id not in self.running:
                    raise RequestAborted(request_id)
                if self.fail_after is not None and k >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                self.progress.last_step = time.monotonic()
                last = k == steps - 1
                if last and self.error_finish:
                    raise EngineFailed(f"request {request_id}: choice 0 finished with an error")
                choices = []
                for i in range(options.n):
                    lp = None
                    if options.logprobs is not None:
                        lp = [TokenLogprob(words[k], -0.5, [(words[k], -0.5)][: options.logprobs])]
                    choices.append(ChoiceDelta(i, words[k], 1, lp, finish if last else None))
                    texts[i] += words[k]
                if options.stream or last:
                    if not options.stream:  # final-only: the whole text at once
                        choices = [
                            ChoiceDelta(i, texts[i], steps, _all_lp(options, words, steps), finish)
                            for i in range(options.n)
                        ]
                    if last:
                        self.progress.last_success = time.monotonic()
                    now = time.time()
                    first_token = first_token or now
                    timings = EngineTimings(queued, queued, first_token, now) if last else None
                    self.working.discard(request_id)  # the step waits for its consumer
                    yield EngineStep(
                        len(prompt_token_ids),
                        choices,
                        last,
                        None,
                        now if k == 0 else None,
                        cached_tokens=cached,
                        timings=timings,
                    )
                    self._work(request_id)
                    cached = None  # only on the first step
        finally:
            self.running.discard(request_id)
            self.working.discard(request_id)


def _all_lp(options: SamplingOptions, words: list[str], steps: int) -> list[TokenLogprob] | None:
    if options.logprobs is None:
        return None
    return [TokenLogprob(words[k], -0.5, [(words[k], -0.5)][: options.logprobs]) for k in range(steps)]
