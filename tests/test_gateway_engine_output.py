"""engine.engine_step, the conversion of vLLM's outputs into EngineStep, as a pure function (no vLLM: outputs are
built with vLLM's field names); and VLLMEngine.generate's mapping of failures, over a stand-in AsyncLLM: only
vLLM's refusal of a request is the client's 400, never a failure of the gateway's own conversion."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from server.gateway import engine as engine_module
from server.gateway.engine import (
    EngineFailed,
    EngineProgress,
    EngineRejected,
    RequestAborted,
    SamplingOptions,
    TokenLogprob,
    VLLMEngine,
    engine_step,
)


def lp(logprob: float, rank: int, token: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=token)


def choice(index=0, text="", token_ids=(), logprobs=None, finish_reason=None, stop_reason=None):
    return SimpleNamespace(
        index=index,
        text=text,
        token_ids=list(token_ids),
        logprobs=logprobs,
        finish_reason=finish_reason,
        stop_reason=stop_reason,
    )


def output(*choices, finished=False, cached=None, prompt_logprobs=None, metrics=None):
    return SimpleNamespace(
        request_id="r1",
        outputs=list(choices),
        finished=finished,
        num_cached_tokens=cached,
        prompt_logprobs=prompt_logprobs,
        metrics=metrics,
    )


def test_choices_tokens_and_finish():
    out = output(
        choice(0, " hi", [5, 6]),
        choice(1, "!", [7], finish_reason="stop", stop_reason="END"),
        choice(2, "x", [8], finish_reason="stop", stop_reason=2),  # a stop token id, not a string
    )
    step = engine_step(out, [1, 2, 3], SamplingOptions(max_tokens=4, n=3), first=True)
    assert step.prompt_tokens == 3 and not step.finished
    assert [(c.index, c.text, c.num_tokens, c.finish_reason) for c in step.choices] == [
        (0, " hi", 2, None),
        (1, "!", 1, "stop"),
        (2, "x", 1, "stop"),
    ]
    assert [c.stop_sequence for c in step.choices] == [None, "END", None]
    assert all(c.logprobs is None for c in step.choices)  # not asked for


def test_cached_tokens_only_on_the_first_step():
    out = output(choice(0, "a", [5]), cached=16)
    options = SamplingOptions(max_tokens=4)
    assert engine_step(out, [1] * 20, options, first=True).cached_tokens == 16
    assert engine_step(out, [1] * 20, options, first=False).cached_tokens is None
    assert engine_step(output(choice(0, "a", [5])), [1], options, first=True).cached_tokens == 0


def test_first_token_time_on_the_first_step_only():
    """vLLM's stats give the first token's wall clock (arrival + latency); the first step carries it, the only one a
    non-streamed request gets (a stream's later steps are not read for it)."""
    stats = SimpleNamespace(arrival_time=1000.0, first_token_latency=0.25, queued_ts=0.0, last_token_ts=0.0)
    out = output(choice(0, "a", [5]), metrics=stats)
    options = SamplingOptions(max_tokens=4)
    assert engine_step(out, [1], options, first=True).first_token_time == 1000.25
    assert engine_step(out, [1], options, first=False).first_token_time is None


def test_logprobs_chosen_token_first_and_top_k_by_rank():
    position = {9: lp(-0.1, 1, "A"), 5: lp(-2.0, 3, "C"), 4: lp(-1.0, 2, "B")}
    out = output(choice(0, "C", [5], logprobs=[position]))
    (c,) = engine_step(out, [1], SamplingOptions(max_tokens=1, logprobs=2), first=True).choices
    assert c.logprobs == [TokenLogprob("C", -2.0, [("A", -0.1), ("B", -1.0)])]
    impossible = output(choice(0, "A", [9], logprobs=[{9: lp(float("-inf"), 1, "A")}]))
    (c,) = engine_step(impossible, [1], SamplingOptions(max_tokens=1, logprobs=0), first=True).choices
    assert c.logprobs[0].logprob == -9999.0  # JSON has no -inf: OpenAI's and vLLM's stand-in


def test_prompt_logprobs_on_the_first_step_with_none_for_the_first_token():
    out = output(choice(0, "a", [5]), prompt_logprobs=[None, {2: lp(-0.5, 1, "b")}])
    options = SamplingOptions(max_tokens=1, prompt_logprobs=0)
    step = engine_step(out, [1, 2], options, first=True)
    assert step.prompt_logprobs == [None, TokenLogprob("b", -0.5, [])]
    assert engine_step(out, [1, 2], options, first=False).prompt_logprobs is None


@pytest.mark.parametrize(("finish", "error"), [("error", EngineFailed), ("abort", RequestAborted)])
def test_error_and_abort_finishes_raise(finish, error):
    with pytest.raises(error):
        engine_step(output(choice(0, "", [], finish_reason=finish)), [1], SamplingOptions(max_tokens=1), True)


# --- VLLMEngine.generate over a stand-in AsyncLLM ----------------------------------------------------------------


class StandInLLM:
    """AsyncLLM's generate as an async generator: `outputs` in order; an exception in the list is raised there."""

    errored = False

    def __init__(self, outputs: list) -> None:
        self.outputs = outputs
        self.unfinished = 0

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished

    async def generate(self, prompt, params, request_id, lora_request=None, priority=0):
        for out in self.outputs:
            if isinstance(out, Exception):
                raise out
            yield out


def vllm_engine(outputs: list) -> VLLMEngine:
    eng = VLLMEngine.__new__(VLLMEngine)  # no engine args, no engine core: only generate's own logic
    eng._llm = StandInLLM(outputs)
    eng._lora_requests = {}
    eng.progress = EngineProgress()
    return eng


def steps_of(eng: VLLMEngine, options: SamplingOptions) -> list:
    async def run():
        return [step async for step in eng.generate([1, 2], options, "r1")]

    return asyncio.run(run())


def test_generate_yields_converted_steps_and_stamps_progress():
    outs = [output(choice(0, "a", [5])), output(choice(0, "b", [6], finish_reason="length"), finished=True)]
    eng = vllm_engine(outs)
    steps = steps_of(eng, SamplingOptions(max_tokens=2))
    assert [s.choices[0].text for s in steps] == ["a", "b"] and steps[-1].finished
    assert eng.progress.last_step > 0 and eng.progress.last_success > 0
    assert eng.progress.busy_since > 0, "an idle engine given a request is busy from then"


def test_a_request_joining_a_busy_engine_keeps_its_busy_since():
    eng = vllm_engine([output(choice(0, "a", [5], finish_reason="length"), finished=True)])
    eng._llm.unfinished = 3
    eng.progress.busy_since = 1.0
    steps_of(eng, SamplingOptions(max_tokens=1))
    assert eng.progress.busy_since == 1.0


def test_vllm_refusing_the_request_is_the_clients_error():
    from vllm.exceptions import VLLMValidationError

    refusal = VLLMValidationError("max_tokens is too large", parameter="max_tokens")
    with pytest.raises(EngineRejected) as exc:
        steps_of(vllm_engine([refusal]), SamplingOptions(max_tokens=1))
    assert exc.value.param == "max_tokens"
    with pytest.raises(EngineRejected):  # SamplingParams' own validation
        steps_of(vllm_engine([]), SamplingOptions(max_tokens=1, temperature=-1.0))


def test_a_failure_after_the_first_output_is_the_engines():
    with pytest.raises(EngineFailed):
        steps_of(
            vllm_engine([output(choice(0, "a", [5])), ValueError("lost")]), SamplingOptions(max_tokens=2)
        )


def test_a_bug_in_the_conversion_is_not_a_400(monkeypatch):
    def broken(*args):
        raise ValueError("a bug of ours")

    monkeypatch.setattr(engine_module, "_token_logprobs", broken)
    position = {5: lp(-0.5, 1, "a")}
    with pytest.raises(ValueError, match="a bug of ours") as exc:
        steps_of(
            vllm_engine([output(choice(0, "a", [5], logprobs=[position]))]),
            SamplingOptions(max_tokens=1, logprobs=0),
        )
    assert not isinstance(exc.value, EngineRejected)
