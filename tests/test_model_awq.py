"""AWQ 4-bit: the tiny AutoAWQ checkpoint served by our class equals transformers on the dequantised weights.

Two engines at the checkpoint's dtype (fp16): the platform's own choice (vLLM's int4 kernels where they
exist - CPUWNA16 linears with AVX-512, CPUExpertsInt4 experts with AMX - dequantised weights where they do
not), and dequantisation forced with DSV2_AWQ_DEQUANTIZE=1, so both paths run on every CI machine. The
reference is transformers in fp32 on the awq_dequantize()-dequantised weights. AWQ at TP=2 is in
test_model_tp.py.
"""

from __future__ import annotations

import logging

import pytest

from tests.model_helpers import (
    FP16_MAX_LOGPROB_DIFF,
    FP16_MAX_TIE_GAP,
    N_TOKENS,
    assert_greedy_agrees,
    awq_reference,
    loaded_model,
    make_llm,
    shutdown,
    vllm_greedy,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def reference(tiny_awq_dir, tmp_path_factory):
    return awq_reference(tiny_awq_dir, tmp_path_factory.mktemp("awq-dequantized"))


@pytest.fixture(scope="module", params=["platform", "dequantize"])
def engine(request: pytest.FixtureRequest, tiny_awq_dir):
    mp = pytest.MonkeyPatch()
    if request.param == "dequantize":
        mp.setenv("DSV2_AWQ_DEQUANTIZE", "1")
    llm = make_llm(tiny_awq_dir)  # dtype from the checkpoint: float16
    yield request.param, llm
    shutdown(llm)
    mp.undo()


def test_awq_layers_use_int4_kernels_or_dense_weights(engine) -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from server.model.awq import detect_int4_kernels
    from server.model.deepseek_v2 import DeepseekV2ForCausalLM

    mode, llm = engine
    model = loaded_model(llm)
    assert type(model) is DeepseekV2ForCausalLM
    kernels = detect_int4_kernels()
    linear_int4 = mode == "platform" and kernels.linear
    moe_int4 = mode == "platform" and kernels.moe
    attn = model.model.layers[0].self_attn
    experts = model.model.layers[1].mlp.experts.routed_experts
    assert isinstance(attn.fused_q_kv_a_proj.quant_method, UnquantizedLinearMethod) != linear_int4
    assert (type(experts.quant_method).__name__ == "UnquantizedFusedMoEMethod") != moe_int4
    assert isinstance(model.model.layers[1].mlp.gate.quant_method, UnquantizedLinearMethod)


def test_awq_matches_transformers_on_dequantized_weights(engine, reference) -> None:
    mode, llm = engine
    prompts, want = reference
    got = vllm_greedy(llm, prompts)
    worst, compared = assert_greedy_agrees(got, want, FP16_MAX_LOGPROB_DIFF, FP16_MAX_TIE_GAP)
    identical = sum(g[0] == w[0] for g, w in zip(got, want, strict=True))
    print(
        f"AWQ ({mode}): {identical}/{len(prompts)} prompts identical for {N_TOKENS} tokens, "
        f"{compared} tokens compared, max |Δ logprob| {worst:.2e}"
    )
    # Near-ties are rare: most of the output must be identical.
    assert compared >= 0.75 * len(prompts) * N_TOKENS


def test_dequantization_logs_one_line(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    from server.model import awq

    monkeypatch.setattr(awq, "_logged", False)
    with caplog.at_level(logging.WARNING, logger="server.model.awq"):
        awq.plan_int4_kernels(force_dequant=True)
        awq.plan_int4_kernels(force_dequant=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.model.awq"]
    assert len(lines) == 1 and "dequantising all AWQ layers" in lines[0]
