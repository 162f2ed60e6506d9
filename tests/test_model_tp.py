"""Tensor parallel: TP=2 (two CPU worker processes, one core each) gives the same greedy tokens as TP=1.

Full V2 layout, fp32: column-parallel q_b/kv_b, replicated fused q_a/kv_a, row-parallel o_proj, TP-sharded
experts and shared experts, vocab-parallel embedding and LM head all take part. Then the AWQ checkpoint at
TP=2, whose layer-0 MLP (192 wide) is replicated because a 96 slice would cut AWQ's 64-groups - the tiny
version of V2-Lite's 10944-wide MLP at TP=2.

Engines run one after another (each shut down before the next starts).
"""

from __future__ import annotations

import pytest

from tests.conftest import FP32_ATTENTION_BACKEND
from tests.model_helpers import (
    FP16_MAX_LOGPROB_DIFF,
    FP16_MAX_TIE_GAP,
    N_TOKENS,
    assert_greedy_agrees,
    assert_same_greedy,
    awq_reference,
    make_llm,
    prompt_ids,
    shutdown,
    vllm_greedy,
)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TP2 = dict(tensor_parallel_size=2, distributed_executor_backend="mp")


def _shard_shapes(model) -> dict:
    """Runs in each worker: what this rank holds (sizes, not weight shapes: the CPU backend repacks)."""
    attn = model.model.layers[0].self_attn
    dense = model.model.layers[0].mlp
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "heads": attn.num_heads,
        "q_out": (attn.q_b_proj if attn.q_lora_rank else attn.q_proj).output_size_per_partition,
        "dense_gate_up": dense.gate_up_proj.output_size_per_partition,
        "moe_inter": model.model.layers[1].mlp.experts.routed_experts.intermediate_size_per_partition,
        "vocab_rows": model.lm_head.num_embeddings_per_partition,
    }


def _generate(model_dir, prompts, **kwargs) -> tuple[list, list[dict] | None]:
    llm = make_llm(model_dir, **kwargs)
    try:
        shards = llm.apply_model(_shard_shapes) if kwargs.get("tensor_parallel_size", 1) > 1 else None
        return vllm_greedy(llm, prompts), shards
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def v2_runs(tiny_v2_dir):
    prompts = prompt_ids(tiny_v2_dir)
    tp1, _ = _generate(tiny_v2_dir, prompts, dtype="float32", attention_backend=FP32_ATTENTION_BACKEND)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        tp2, shards = _generate(
            tiny_v2_dir, prompts, dtype="float32", attention_backend=FP32_ATTENTION_BACKEND, **TP2
        )
    return tp1, tp2, shards


def test_tp2_splits_heads_experts_and_vocab(v2_runs) -> None:
    _, _, shards = v2_runs
    assert len(shards) == 2
    for s in shards:
        assert s["class"] == "server.model.deepseek_v2.DeepseekV2ForCausalLM"
        assert s["heads"] == 8  # 16 / 2
        assert s["q_out"] == 8 * (32 + 64)
        assert s["dense_gate_up"] == 2 * 96  # unquantised: the 192-wide dense MLP is split
        assert s["moe_inter"] == 64  # every expert, half of its 128-wide intermediate
        assert s["vocab_rows"] == 512  # 1024 / 2


def test_tp2_matches_tp1(v2_runs) -> None:
    tp1, tp2, _ = v2_runs
    worst = assert_same_greedy(tp2, tp1, max_logprob_diff=1e-3)
    print(f"TP=2 == TP=1 on {len(tp1)} prompts, max |Δ logprob| {worst:.2e}")


def test_awq_tp2_replicates_the_dense_mlp_and_matches(tiny_awq_dir, tmp_path, monkeypatch) -> None:
    prompts, want = awq_reference(tiny_awq_dir, tmp_path / "dequantized")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    got, shards = _generate(tiny_awq_dir, prompts, **TP2)
    for s in shards:
        assert s["dense_gate_up"] == 2 * 192  # whole on both ranks
        assert s["moe_inter"] == 64  # experts still split: 64 = one AWQ group
    worst, compared = assert_greedy_agrees(got, want, FP16_MAX_LOGPROB_DIFF, FP16_MAX_TIE_GAP)
    print(f"AWQ TP=2: {compared} tokens compared, max |Δ logprob| {worst:.2e}")
    assert compared >= 0.75 * len(prompts) * N_TOKENS
