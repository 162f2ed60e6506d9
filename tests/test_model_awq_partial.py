"""Partially quantised AWQ exports: linears AutoAWQ left in fp16 (`modules_to_not_convert`) load at every TP
size, and a fused projection whose checkpoint shards differ in quantisation falls back to separate layers.

Tiny V2-Lite AWQ exports (group 64) that leave one module kind in fp16:
- `kv_a_proj_with_mqa`: at TP=1 our class fuses it with `q_proj` into one GEMM; with only `q_proj` quantised
  the two stay apart (vLLM refuses a fused layer with "some but not all shards" quantised);
- layer 0's `down_proj` (what AutoAWQ leaves of V2-Lite's 10944-wide MLP at group 128);
- the shared experts' `up_proj`: `gate_up_proj` falls back to separate gate and up projections.
Each against transformers in fp32 on the export's dequantised weights. Where vLLM has int4 linear kernels
(AVX-512 CPUs, GPUs) the quantised shards run them; elsewhere every AWQ layer is dequantised at load time and
the layout is the same.
"""

from __future__ import annotations

import pytest

from tests.model_helpers import (
    FP16_MAX_LOGPROB_DIFF,
    FP16_MAX_TIE_GAP,
    N_TOKENS,
    assert_greedy_agrees,
    awq_reference,
    make_llm,
    shutdown,
    vllm_greedy,
)

pytestmark = pytest.mark.engine

SKIPS = {
    "kv_a": "kv_a_proj_with_mqa",
    "down0": "model.layers.0.mlp.down_proj",
    "shared_up": "shared_experts.up_proj",
}
CASES = [("kv_a", 1), ("kv_a", 2), ("down0", 1), ("down0", 2), ("shared_up", 1)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """skip name -> (export dir, prompts, transformers reference)."""
    from server.tiny_model import write_tiny_model

    out = {}
    for key, skip in SKIPS.items():
        d = write_tiny_model(tmp_path_factory.mktemp(f"awq-skip-{key}"), awq=True, awq_skip=(skip,))
        prompts, want = awq_reference(d, tmp_path_factory.mktemp(f"awq-skip-{key}-dense"))
        out[key] = (d, prompts, want)
    return out


def _layout(model) -> dict:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    attn = model.model.layers[0].self_attn
    dense = model.model.layers[0].mlp
    shared = model.model.layers[1].mlp.shared_experts
    return {
        "fused_q_kv_a": attn.fused_a is not None,
        "kv_a_int4": not isinstance(
            (attn.fused_q_kv_a_proj if attn.fused_a else attn.kv_a_proj_with_mqa).quant_method,
            UnquantizedLinearMethod,
        ),
        "down0_int4": not isinstance(dense.down_proj.quant_method, UnquantizedLinearMethod),
        "shared_fused": shared.fuse_gate_up,
    }


def test_checkpoint_leaves_the_module_in_fp16(exports) -> None:
    import json

    from safetensors import safe_open

    d, _, _ = exports["kv_a"]
    with safe_open(d / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in names
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    quant = json.loads((d / "config.json").read_text())["quantization_config"]
    assert quant["modules_to_not_convert"] == ["kv_a_proj_with_mqa"]


@pytest.mark.parametrize(("skip", "tp"), CASES, ids=[f"{s}-tp{t}" for s, t in CASES])
def test_partial_export_loads_and_matches(exports, skip: str, tp: int, monkeypatch) -> None:
    from server.model.awq import detect_int4_kernels

    d, prompts, want = exports[skip]
    kwargs = {}
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        kwargs = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
    llm = make_llm(d, **kwargs)
    try:
        layouts = llm.apply_model(_layout)
        got = vllm_greedy(llm, prompts)
    finally:
        shutdown(llm)
    int4 = detect_int4_kernels().linear
    for layout in layouts:
        # kv_a in fp16 and q_proj in int4 cannot be one GEMM; otherwise TP=1 fuses them.
        assert layout["fused_q_kv_a"] == (tp == 1 and skip != "kv_a")
        assert layout["kv_a_int4"] == (int4 and skip != "kv_a")
        assert layout["down0_int4"] == (int4 and skip != "down0")
        assert layout["shared_fused"] == (skip != "shared_up")
    worst, compared = assert_greedy_agrees(got, want, FP16_MAX_LOGPROB_DIFF, FP16_MAX_TIE_GAP)
    print(f"AWQ without {SKIPS[skip]} at TP={tp}: {compared} tokens compared, max |Δ logprob| {worst:.2e}")
    assert compared >= 0.75 * len(prompts) * N_TOKENS


def test_fusion_follows_the_checkpoints_quantisation() -> None:
    """The decision itself, without an engine: one GEMM only when the shards are quantised alike."""
    from types import SimpleNamespace

    from server.model.deepseek_v2 import QuantPlan

    plan = QuantPlan.__new__(QuantPlan)
    plan.base = SimpleNamespace(modules_to_not_convert=["kv_a_proj_with_mqa", "model.layers.0.mlp.down_proj"])
    plan.not_converted = plan.base.modules_to_not_convert
    attn, mlp = "model.layers.3.self_attn", "model.layers.0.mlp"
    assert not plan.fuses(attn, ["q_proj", "kv_a_proj_with_mqa"])
    assert plan.fuses(mlp, ["gate_proj", "up_proj"])
    assert not plan.quantised(f"{mlp}.down_proj") and plan.quantised("model.layers.10.mlp.down_proj")
    plan.base, plan.not_converted = None, []
    assert plan.fuses(attn, ["q_proj", "kv_a_proj_with_mqa"])  # unquantised checkpoint: always fused
