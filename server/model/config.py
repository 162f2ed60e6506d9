"""Config checks: which DeepSeek-V2 configurations and parallel layouts this plugin serves.

Kept free of torch/vLLM layer imports so that `register()` can install the checks in the API process
(through vLLM's per-architecture config hook) without importing the model: a config outside the family, or
a tensor-parallel size the heads do not split into, is refused when vLLM builds its config, before any
worker starts. The model constructor runs the same checks again inside every worker.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

ARCHITECTURE = "DeepseekV2ForCausalLM"
MODEL_TYPE = "deepseek_v2"

TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")
AWQ_METHODS = ("awq", "awq_marlin", "auto_awq")


def _get(config: Any, field: str, default: Any = None) -> Any:
    return getattr(config, field, default)


def _refuse(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"dsv2-serve: unsupported DeepSeek-V2 config: {field}={value!r} ({expected}); "
        "this plugin serves the DeepSeek-V2 family (V2, V2-Lite, their Chat variants) only"
    )


def rope_type(config: Any) -> str:
    """'default' or 'yarn', from `rope_parameters` (transformers >= 5) or the legacy `rope_scaling`."""
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default")) or "default"


def quant_group_size(config: Any) -> int | None:
    """The AWQ group size the checkpoint declares, or None for an unquantised checkpoint."""
    quant = _get(config, "quantization_config")
    if not quant:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return int(quant.get("group_size", quant.get("q_group_size", -1)))


def check_family(config: Any) -> None:
    """Refuse, naming the field and its value, any config this model file does not implement exactly."""
    model_type = _get(config, "model_type")
    if model_type != MODEL_TYPE:
        raise _refuse("model_type", model_type, f"expected {MODEL_TYPE!r}")
    if _get(config, "index_topk") is not None:
        raise _refuse("index_topk", _get(config, "index_topk"), "sparse attention (V3.2) is not supported")
    for field in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        value = _get(config, field)
        if not isinstance(value, int) or value <= 0:
            raise _refuse(field, value, "MLA needs a positive value")
    q_lora_rank = _get(config, "q_lora_rank")
    if q_lora_rank is not None and (not isinstance(q_lora_rank, int) or q_lora_rank <= 0):
        raise _refuse("q_lora_rank", q_lora_rank, "expected null or a positive rank")
    if _get(config, "hidden_act") != "silu":
        raise _refuse("hidden_act", _get(config, "hidden_act"), "expected 'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if _get(config, field, False):
            raise _refuse(field, _get(config, field), "DeepSeek-V2 has no biases")
    if rope_type(config) not in ROPE_TYPES:
        raise _refuse("rope_scaling.type", rope_type(config), f"expected one of {ROPE_TYPES}")
    if _get(config, "tie_word_embeddings", False):
        raise _refuse("tie_word_embeddings", True, "DeepSeek-V2 has a separate lm_head")

    n_routed = _get(config, "n_routed_experts")
    if n_routed is None:
        return  # every layer dense
    if _get(config, "scoring_func", "softmax") != "softmax":
        raise _refuse("scoring_func", _get(config, "scoring_func"), "DeepSeek-V2 routes with 'softmax'")
    if _get(config, "moe_layer_freq", 1) != 1:
        raise _refuse("moe_layer_freq", _get(config, "moe_layer_freq"), "expected 1")
    method = _get(config, "topk_method", "greedy")
    if method not in TOPK_METHODS:
        raise _refuse("topk_method", method, f"expected one of {TOPK_METHODS}")
    top_k = _get(config, "num_experts_per_tok")
    if not isinstance(top_k, int) or not 0 < top_k <= n_routed:
        raise _refuse("num_experts_per_tok", top_k, f"expected 1..n_routed_experts={n_routed}")
    if method == "group_limited_greedy":
        n_group, topk_group = _get(config, "n_group"), _get(config, "topk_group")
        if not isinstance(n_group, int) or n_group <= 0 or n_routed % n_group:
            raise _refuse("n_group", n_group, f"must divide n_routed_experts={n_routed}")
        if not isinstance(topk_group, int) or not 0 < topk_group <= n_group:
            raise _refuse("topk_group", topk_group, f"expected 1..n_group={n_group}")
        if top_k > topk_group * (n_routed // n_group):
            raise _refuse("num_experts_per_tok", top_k, "more than the experts in the selected groups")

    quant = _get(config, "quantization_config")
    if quant:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        method = str(quant.get("quant_method", "")).lower()
        if method not in AWQ_METHODS:
            raise _refuse("quantization_config.quant_method", method, "only AWQ 4-bit is supported")
        bits = quant.get("bits", quant.get("w_bit"))
        if bits != 4:
            raise _refuse("quantization_config.bits", bits, "only AWQ 4-bit is supported")
        if not quant.get("zero_point", True):
            raise _refuse("quantization_config.zero_point", False, "expected AutoAWQ's zero-point layout")


def tp_misfit(config: Any, tp: int, expert_parallel: bool = False) -> str | None:
    """Why `tp` does not split this model (heads, or a tensor-parallel width on quantisation-group
    boundaries), or None when it does."""
    heads = config.num_attention_heads
    if tp < 1 or heads % tp:
        return f"num_attention_heads={heads} is not a multiple of {tp}"
    group = quant_group_size(config)
    group = group if group and group > 0 else None
    # A quantised dense MLP whose slice would cut a quantisation group is replicated instead of split
    # (see dense_mlp_is_replicated), so only an unquantised one has to divide evenly.
    if not group and config.intermediate_size % tp:
        return f"intermediate_size={config.intermediate_size} is not a multiple of {tp}"
    if _get(config, "n_routed_experts") is None:
        return None
    # Input widths of the row-parallel projections a rank holds a slice of.
    sharded = {} if expert_parallel else {"moe_intermediate_size": config.moe_intermediate_size}
    sharded["shared experts' width"] = config.moe_intermediate_size * (_get(config, "n_shared_experts") or 0)
    for what, dim in sharded.items():
        if dim % tp:
            return f"{what} {dim} is not a multiple of {tp}"
        if group and dim and (dim // tp) % group:
            hint = (
                "; --enable-expert-parallel keeps routed experts whole"
                if what == "moe_intermediate_size"
                else ""
            )
            return (
                f"{what} {dim} / {tp} = {dim // tp} is not a multiple of the AWQ group_size {group}: a rank's "
                f"slice would cut a quantisation group{hint}"
            )
    return None


def dense_mlp_is_replicated(config: Any, tp: int) -> bool:
    """V2-Lite's layer-0 MLP is 10944 wide: at TP=2 a 5472 slice cuts AWQ's 64-groups, so keep it whole."""
    group = quant_group_size(config)
    inter = config.intermediate_size
    return tp > 1 and bool(group) and group > 0 and (inter % tp != 0 or (inter // tp) % group != 0)


def valid_tp_sizes(config: Any, expert_parallel: bool = False) -> list[int]:
    return [
        tp
        for tp in range(1, config.num_attention_heads + 1)
        if tp_misfit(config, tp, expert_parallel) is None
    ]


def check_parallel(config: Any, tp: int, expert_parallel: bool = False) -> None:
    reason = tp_misfit(config, tp, expert_parallel)
    if reason is not None:
        valid = ", ".join(map(str, valid_tp_sizes(config, expert_parallel)))
        ep = " with expert parallelism" if expert_parallel else ""
        raise ValueError(
            f"dsv2-serve: tensor_parallel_size={tp} does not split this model ({reason}); "
            f"valid tensor_parallel_size values{ep}: {valid}"
        )


class DeepseekV2ConfigCheck:
    """vLLM's per-architecture config hook (`vllm.model_executor.models.config.MODELS_CONFIG_MAP`)."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        check_family(model_config.hf_config)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        check_family(hf_config)
        check_engine_features(vllm_config)
        limit_lora_targets(vllm_config)
        check_parallel(hf_config, parallel.tensor_parallel_size, bool(parallel.enable_expert_parallel))
        avoid_amx_mla_without_bf16(vllm_config)


BUILTIN_HINT = "or serve with vLLM's built-in DeepSeek-V2 class (VLLM_PLUGINS set without dsv2_serve)"


def check_engine_features(vllm_config: Any) -> None:
    """Engine modes vLLM's built-in class has and ours does not: refused up front, saying what to do."""
    if not vllm_config.model_config.use_mla:
        raise ValueError(
            "dsv2-serve: use_mla=False (VLLM_MLA_DISABLE=1) is not supported: this plugin runs DeepSeek-V2's "
            "attention only as MLA (a 576-value latent cache); unset VLLM_MLA_DISABLE, " + BUILTIN_HINT
        )
    if getattr(vllm_config.parallel_config, "enable_eplb", False):
        raise ValueError(
            "dsv2-serve: --enable-eplb is not supported: this plugin's model class does not implement vLLM's "
            "MixtureOfExperts interface (expert load balancing moves experts between ranks at run time); "
            "use --enable-expert-parallel without EPLB, " + BUILTIN_HINT
        )


def avoid_amx_mla_without_bf16(vllm_config: Any) -> None:
    """vLLM 0.32 picks AMX_MLA on every AMX CPU, but that backend only takes bf16: fp32 weights are refused
    and fp16 (the dtype AWQ checkpoints declare) silently produces garbage. Use the reference CPU MLA
    backend for those dtypes unless the user chose a backend."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or vllm_config.attention_config.backend is not None:
        return
    dtype = vllm_config.model_config.dtype
    if dtype == torch.bfloat16 or not torch.cpu._is_amx_tile_supported():
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_config.attention_config.backend = AttentionBackendEnum.CPU_MLA
    logger.warning(
        "dsv2-serve: dtype %s on an AMX CPU: using the CPU_MLA attention backend (AMX_MLA takes only bf16)",
        dtype,
    )


# Linears a LoRA adapter may adapt. Not kv_b_proj: MLA absorbs it into the query and the output at load time,
# so decode would never see its adapter.
LORA_TARGETS = [
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def limit_lora_targets(vllm_config: Any) -> None:
    """With LoRA on, adapt the linears listed above; on GPUs the routed experts too (vLLM's MoE LoRA kernel is
    Triton, which its CPU build lacks: there the experts are built without LoRA, see deepseek_v2.py)."""
    lora = vllm_config.lora_config
    if lora is None:
        return
    from vllm.platforms import current_platform

    allowed = LORA_TARGETS + ([] if current_platform.is_cpu() else ["experts"])
    if lora.target_modules is None:
        lora.target_modules = list(allowed)
        return
    refused = sorted(set(lora.target_modules) - set(allowed))
    if refused:
        raise ValueError(
            f"dsv2-serve: LoRA target modules {refused} are not supported here; allowed: {allowed} "
            "(kv_b_proj is absorbed into MLA at load time; routed experts need vLLM's Triton MoE LoRA kernel, "
            "which vLLM's CPU build lacks)"
        )
