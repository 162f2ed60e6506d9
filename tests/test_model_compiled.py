"""The compiled path, vLLM's default: without `enforce_eager` vLLM torch.compiles our model (inductor on the
CPU, CUDA graphs on top on GPUs). On the tiny V2-Lite checkpoint in fp32, compiled TP=1 and TP=2 give the same
greedy tokens as eager mode and as transformers. The real-width checkpoint's compiled runs are in
test_model_real_widths.py.

Compilation takes about a minute per engine on 2 cores; vLLM caches the compiled graph under
~/.cache/vllm/torch_compile_cache, so a second run on the same machine starts faster.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FP32_ATTENTION_BACKEND
from tests.model_helpers import (
    assert_same_greedy,
    hf_greedy,
    hf_model,
    make_llm,
    prompt_ids,
    shutdown,
    vllm_greedy,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

FP32 = dict(dtype="float32", attention_backend=FP32_ATTENTION_BACKEND)
TP2 = dict(tensor_parallel_size=2, distributed_executor_backend="mp")


@pytest.fixture(scope="module")
def reference(tiny_lite_dir):
    prompts = prompt_ids(tiny_lite_dir)
    return prompts, hf_greedy(hf_model(tiny_lite_dir, torch.float32), prompts)


@pytest.fixture(scope="module")
def eager(tiny_lite_dir, reference):
    prompts, _ = reference
    llm = make_llm(tiny_lite_dir, **FP32)
    try:
        return vllm_greedy(llm, prompts)
    finally:
        shutdown(llm)


def _compiled_state(model) -> dict:
    """Runs in each worker: whether the decoder stack is compiled (vLLM's @support_torch_compile state)."""
    from vllm.config import CompilationMode

    inner = model.model
    return {
        # vLLM's CPU platform traces once with Dynamo and compiles with inductor; GPUs use VLLM_COMPILE.
        "mode": inner.compilation_config.mode
        in (CompilationMode.DYNAMO_TRACE_ONCE, CompilationMode.VLLM_COMPILE),
        "compiled": bool(getattr(inner, "compiled", False) or getattr(inner, "aot_compiled_fn", None)),
        "do_not_compile": inner.do_not_compile,
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_compiled_matches_eager_and_transformers(
    tiny_lite_dir, reference, eager, tp: int, monkeypatch
) -> None:
    prompts, want = reference
    kwargs = dict(FP32, enforce_eager=False)
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        kwargs.update(TP2)
    llm = make_llm(tiny_lite_dir, **kwargs)
    try:
        states = llm.apply_model(_compiled_state)
        got = vllm_greedy(llm, prompts)
    finally:
        shutdown(llm)
    assert len(states) == tp
    for state in states:
        assert state["mode"] and not state["do_not_compile"] and state["compiled"], state
    assert_same_greedy(got, eager, max_logprob_diff=1e-4)
    worst = assert_same_greedy(got, want, max_logprob_diff=1e-3)
    print(f"compiled TP={tp}: tokens identical to eager and transformers, max |Δ logprob| {worst:.2e}")
