"""Our vLLM model class against transformers' DeepseekV2ForCausalLM, fp32, on the tiny checkpoints.

One in-process engine per layout (V2-Lite: plain q projection, greedy routing; full V2: q compression,
group-limited routing, routed_scaling_factor 16). fp32 because bf16 rounding alone flips a greedy token
after ~20 steps; CPU_MLA because the AMX MLA backend takes no fp32 weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FP32_ATTENTION_BACKEND
from tests.model_helpers import (
    N_TOKENS,
    PROMPTS,
    assert_same_greedy,
    hf_greedy,
    hf_model,
    loaded_model,
    make_llm,
    prompt_ids,
    shutdown,
    vllm_greedy,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", params=["lite", "v2"])
def engine(request: pytest.FixtureRequest, tiny_lite_dir, tiny_v2_dir):
    model_dir = tiny_lite_dir if request.param == "lite" else tiny_v2_dir
    llm = make_llm(model_dir, dtype="float32", attention_backend=FP32_ATTENTION_BACKEND)
    yield request.param, model_dir, llm
    shutdown(llm)


def test_vllm_builds_our_class(engine) -> None:
    from vllm.model_executor.layers.attention import MLAAttention

    from server.model.deepseek_v2 import DeepseekV2Attention, DeepseekV2ForCausalLM

    _, _, llm = engine
    model = loaded_model(llm)
    assert type(model) is DeepseekV2ForCausalLM
    attn = model.model.layers[0].self_attn
    assert type(attn) is DeepseekV2Attention
    assert isinstance(attn.attn, MLAAttention)


def test_greedy_matches_transformers(engine) -> None:
    variant, model_dir, llm = engine
    prompts = prompt_ids(model_dir)
    assert len(prompts) == len(PROMPTS) >= 4
    got = vllm_greedy(llm, prompts, N_TOKENS)
    want = hf_greedy(hf_model(model_dir, torch.float32), prompts, N_TOKENS)
    worst = assert_same_greedy(got, want, max_logprob_diff=1e-3)
    print(f"{variant}: {len(prompts)} prompts x {N_TOKENS} tokens identical, max |Δ logprob| {worst:.2e}")


def test_kv_cache_holds_only_the_latent(engine) -> None:
    """Bytes per token = layers x (kv_lora_rank + qk_rope_head_dim) x dtype size: 3 x 576 x 4 here."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    _, _, llm = engine
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    config = runner.model.config
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    assert latent == 576
    specs = runner.get_kv_cache_spec()
    assert len(specs) == config.num_hidden_layers
    assert all(isinstance(s, MLAAttentionSpec) and s.num_kv_heads == 1 for s in specs.values())
    per_token = sum(s.page_size_bytes // s.block_size for s in specs.values())
    assert per_token == config.num_hidden_layers * latent * torch.float32.itemsize
    for layer in runner.model.model.layers:
        cache = layer.self_attn.attn.kv_cache
        assert cache.shape[-1] == latent and cache.dtype == torch.float32
