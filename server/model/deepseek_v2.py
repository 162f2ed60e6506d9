"""DeepSeek-V2 / V2-Lite for vLLM, built from vLLM's generic layers.

Read top to bottom: config checks -> MLA attention -> MoE -> decoder layer -> model -> ForCausalLM.

- MLA: the KV cache holds one 576-d vector per token and layer (V2-Lite: the RMS-normalised 512-d latent and
  the rotated 64-d rope key). vLLM's `MLAAttention` runs prefill as ordinary attention over up-projected
  K/V and decode in the latent space with W_UK / W_UV absorbed from `kv_b_proj`, on whichever MLA backend
  the platform has (FlashMLA, Triton MLA, FlashInfer MLA, CPU).
- YaRN as DeepSeek-V2 defines it: interleaved (GPT-J style) rotary on the rope dims only, and the mscale
  (0.1 * mscale_all_dim * ln(factor) + 1)^2 folded into the softmax scale.
- DeepSeekMoE: softmax router, greedy or group-limited top-k, routed experts through FusedMoE, the shared
  experts added once, a dense MLP for the first `first_k_dense_replace` layers.
- Tensor parallel lives in the layer types: heads split by column-parallel q/kv_b projections, the
  kv_a (and q_a) projections replicated (and fused with the GEMM that reads the same input where
  possible), o_proj and down projections row-parallel, experts TP-sharded or
  expert-parallel as vLLM's parallel config says, vocab-parallel embedding and LM head.
"""

import copy
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

import torch
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config, set_current_vllm_config
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import MLAAttention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from server.model import weights
from server.model.awq import plan_int4_kernels
from server.model.config import (
    check_family,
    check_parallel,
    dense_mlp_is_replicated,
    quant_group_size,
    rope_type,
)

# Set to 1 to serve an AWQ checkpoint dequantised even where vLLM has int4 kernels (tests, debugging).
AWQ_DEQUANTIZE_ENV = "DSV2_AWQ_DEQUANTIZE"


# ---------------------------------------------------------------------------------------------------------
# Config


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(config: PretrainedConfig) -> dict:
    """vLLM rope parameters for DeepSeek's rotary: YaRN becomes vLLM's `deepseek_yarn`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000))
    params.pop("type", None)
    params["rope_type"] = "deepseek_yarn" if rope_type(config) == "yarn" else "default"
    return params


def softmax_scale(config: PretrainedConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's attention-temperature correction mscale^2 when YaRN is on."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    if rope_type(config) == "yarn":
        params = rope_parameters(config)
        mscale_all_dim = float(params.get("mscale_all_dim", 0) or 0)
        if mscale_all_dim:
            m = yarn_mscale(params["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


def routed_scaling(config: PretrainedConfig) -> float:
    """DeepSeek-V2 either renormalises the top-k weights or scales them by routed_scaling_factor, never both."""
    if config.norm_topk_prob and config.num_experts_per_tok > 1:
        return 1.0
    return float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)


class QuantPlan:
    """Which quantisation config each kind of layer gets; None builds the layer unquantised."""

    def __init__(self, quant_config: QuantizationConfig | None, hf_config: PretrainedConfig, tp: int):
        self.base = quant_config
        self.group_size = quant_group_size(hf_config) if quant_config is not None else None
        kernels = plan_int4_kernels(os.environ.get(AWQ_DEQUANTIZE_ENV) == "1") if quant_config else None
        self.linear = quant_config if kernels and kernels.linear else None
        self.moe = quant_config if kernels and kernels.moe else None
        self.replicate_dense_mlp = quant_config is not None and dense_mlp_is_replicated(hf_config, tp)
        # AutoAWQ's list (or, when the checkpoint has none, vLLM's: every module without int4 tensors).
        self.not_converted: list[str] = list(getattr(quant_config, "modules_to_not_convert", None) or [])

    def quantised(self, module: str) -> bool:
        """Whether the checkpoint holds this linear in quantised form (matched as vLLM's AWQ config does)."""
        return self.base is not None and not is_layer_skipped(
            module, self.not_converted, match_mode="substring"
        )

    def fuses(self, prefix: str, shards: list[str]) -> bool:
        """One GEMM for checkpoint modules `prefix.<shard>` only when they are all quantised or all not:
        a fused layer has one quantisation method (vLLM refuses "some but not all shards" quantised)."""
        return len({self.quantised(f"{prefix}.{shard}") for shard in shards}) == 1


# ---------------------------------------------------------------------------------------------------------
# MLA attention


class DeepseekV2Attention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        cache_config: CacheConfig | None,
        quant: QuantPlan,
        prefix: str,
    ) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = config.num_attention_heads // tp
        self.q_lora_rank: int | None = config.q_lora_rank
        self.kv_lora_rank: int = config.kv_lora_rank
        self.qk_nope_head_dim: int = config.qk_nope_head_dim
        self.qk_rope_head_dim: int = config.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim: int = config.v_head_dim
        hidden, heads = config.hidden_size, config.num_attention_heads
        latent = self.kv_lora_rank + self.qk_rope_head_dim  # 576 for V2-Lite: what the KV cache stores

        # The a-projections are small and every rank needs their whole output: replicated. Projections of
        # the layer input are one GEMM where every rank holds all of them (V2's q_a_proj; V2-Lite's q_proj
        # at TP=1) and the checkpoint quantised them alike; otherwise they stay apart.
        first_name = "q_a_proj" if self.q_lora_rank is not None else "q_proj"
        self.first_out = self.q_lora_rank if self.q_lora_rank is not None else heads * self.qk_head_dim
        self.fused_a: str | None = None
        if (self.q_lora_rank is not None or tp == 1) and quant.fuses(
            prefix, [first_name, "kv_a_proj_with_mqa"]
        ):
            self.fused_a = "fused_qkv_a_proj" if self.q_lora_rank is not None else "fused_q_kv_a_proj"
            # checkpoint shard 0 = q_a_proj / q_proj, shard 1 = kv_a_proj_with_mqa
            fused = MergedColumnParallelLinear(
                hidden,
                [self.first_out, latent],
                bias=False,
                quant_config=quant.linear,
                disable_tp=True,
                prefix=f"{prefix}.{self.fused_a}",
            )
            setattr(self, self.fused_a, fused)
        else:
            if self.q_lora_rank is not None:
                self.q_a_proj = ReplicatedLinear(
                    hidden,
                    self.q_lora_rank,
                    bias=False,
                    quant_config=quant.linear,
                    prefix=f"{prefix}.q_a_proj",
                )
            else:
                self.q_proj = ColumnParallelLinear(
                    hidden,
                    heads * self.qk_head_dim,
                    bias=False,
                    quant_config=quant.linear,
                    prefix=f"{prefix}.q_proj",
                )
            self.kv_a_proj_with_mqa = ReplicatedLinear(
                hidden, latent, bias=False, quant_config=quant.linear, prefix=f"{prefix}.kv_a_proj_with_mqa"
            )
        if self.q_lora_rank is not None:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(
                self.q_lora_rank,
                heads * self.qk_head_dim,
                bias=False,
                quant_config=quant.linear,
                prefix=f"{prefix}.q_b_proj",
            )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        # Up-projection latent -> per-head [k_nope | v]; MLAAttention absorbs it into q and the output.
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank,
            heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
            quant_config=quant.linear,
            prefix=f"{prefix}.kv_b_proj",
        )
        self.o_proj = RowParallelLinear(
            heads * self.v_head_dim, hidden, bias=False, quant_config=quant.linear, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = get_rope(
            self.qk_rope_head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=rope_parameters(config),
            is_neox_style=False,  # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...
        )
        self.attn = MLAAttention(
            num_heads=self.num_heads,
            scale=softmax_scale(config),
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            kv_b_proj=self.kv_b_proj,
            cache_config=cache_config,
            quant_config=quant.base,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        latent_dim = self.kv_lora_rank + self.qk_rope_head_dim
        if self.fused_a is not None:
            # At TP=1 (the only fused V2-Lite layout) first_out is this rank's whole q.
            q, latent = getattr(self, self.fused_a)(hidden_states)[0].split(
                [self.first_out, latent_dim], dim=-1
            )
        else:
            q = (self.q_a_proj if self.q_lora_rank is not None else self.q_proj)(hidden_states)[0]
            latent = self.kv_a_proj_with_mqa(hidden_states)[0]  # [T, 576]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))[0]  # q was the compressed q_c
        q = q.view(-1, self.num_heads, self.qk_head_dim)  # [T, H, nope + rope]
        kv_c, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_c_normed = self.kv_a_layernorm(kv_c)  # [T, 512]
        k_pe = k_pe.unsqueeze(1)  # [T, 1, 64]: one rope key shared by all heads
        q[..., self.qk_nope_head_dim :], k_pe = self.rotary_emb(
            positions, q[..., self.qk_nope_head_dim :], k_pe
        )
        # Caches [kv_c_normed | k_pe] and attends; returns [T, H * v_head_dim].
        out = self.attn(
            q, kv_c_normed, k_pe, output_shape=(hidden_states.shape[0], self.num_heads * self.v_head_dim)
        )
        return self.o_proj(out)[0]


# ---------------------------------------------------------------------------------------------------------
# MLP and MoE


class DeepseekV2MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
        reduce_results: bool = True,
        replicated: bool = False,
        fuse_gate_up: bool = True,
    ) -> None:
        super().__init__()
        # gate and up read the same input: one GEMM, unless the checkpoint quantised only one of them.
        self.fuse_gate_up = fuse_gate_up
        if fuse_gate_up:
            self.gate_up_proj = MergedColumnParallelLinear(
                hidden_size,
                [intermediate_size] * 2,
                bias=False,
                quant_config=quant_config,
                disable_tp=replicated,
                prefix=f"{prefix}.gate_up_proj",
            )
        else:
            self.gate_proj, self.up_proj = (
                ColumnParallelLinear(
                    hidden_size,
                    intermediate_size,
                    bias=False,
                    quant_config=quant_config,
                    disable_tp=replicated,
                    prefix=f"{prefix}.{name}",
                )
                for name in ("gate_proj", "up_proj")
            )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            reduce_results=reduce_results,
            disable_tp=replicated,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_gate_up:
            gate_up = self.gate_up_proj(x)[0]
        else:
            gate_up = torch.cat([self.gate_proj(x)[0], self.up_proj(x)[0]], dim=-1)  # [T, 2 * inter]
        return self.down_proj(self.act_fn(gate_up))[0]


@contextmanager
def routed_experts_without_lora() -> Iterator[None]:
    """Build the routed experts as if LoRA were off, on the CPU only.

    vLLM 0.32 gives every MoE layer of a LoRA-enabled engine its Triton MoE kernel (LoRA on experts runs
    there), and its CPU build has no Triton: the first forward fails with "module 'triton.language' has no
    attribute 'float32'" (vLLM's built-in class too). Built without LoRA the experts keep the CPU kernel;
    the config hook then limits LoRA to the other linears (config.limit_lora_targets_on_cpu).
    """
    from vllm.platforms import current_platform

    vllm_config = get_current_vllm_config()
    if not current_platform.is_cpu() or vllm_config.lora_config is None:
        yield
        return
    without_lora = copy.copy(vllm_config)  # shallow: the same model, cache and compilation configs
    object.__setattr__(without_lora, "lora_config", None)
    with set_current_vllm_config(without_lora):
        yield


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: PretrainedConfig, quant: QuantPlan, prefix: str) -> None:
        super().__init__()
        group_limited = config.topk_method == "group_limited_greedy"
        # The router stays unquantised in AWQ checkpoints too.
        self.gate = GateLinear(config.hidden_size, config.n_routed_experts, prefix=f"{prefix}.gate")
        self.shared_experts = None
        if config.n_shared_experts:
            # reduce_results=False: the MoE runner all-reduces shared + routed output once.
            self.shared_experts = DeepseekV2MLP(
                config.hidden_size,
                config.moe_intermediate_size * config.n_shared_experts,
                quant.linear,
                prefix=f"{prefix}.shared_experts",
                reduce_results=False,
                fuse_gate_up=quant.fuses(f"{prefix}.shared_experts", ["gate_proj", "up_proj"]),
            )
        with routed_experts_without_lora():
            self.experts = self._routed_experts(config, quant, prefix, group_limited)

    def _routed_experts(
        self, config: PretrainedConfig, quant: QuantPlan, prefix: str, group_limited: bool
    ) -> nn.Module:
        return FusedMoEFactory(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob) and config.num_experts_per_tok > 1,
            quant_config=quant.moe,
            # Greedy top-k is group-limited top-k with one group.
            use_grouped_topk=True,
            num_expert_group=config.n_group if group_limited else 1,
            topk_group=config.topk_group if group_limited else 1,
            scoring_func="softmax",
            routed_scaling_factor=routed_scaling(config),
            # Scale the routed sum, not the weights: lets fp16 keep the residual stream in 1/scale units.
            apply_routed_scale_to_output=True,
            gate=self.gate,
            shared_experts=self.shared_experts,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The runner applies the gate itself; router_logits is a placeholder it overwrites.
        return self.experts(hidden_states=hidden_states, router_logits=hidden_states)


# ---------------------------------------------------------------------------------------------------------
# Decoder layer and model


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, quant: QuantPlan, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.layer_idx = int(prefix.rsplit(".", 1)[-1])
        self.self_attn = DeepseekV2Attention(
            config, vllm_config.cache_config, quant, prefix=f"{prefix}.self_attn"
        )
        self.mlp: DeepseekV2MLP | DeepseekV2MoE
        if config.n_routed_experts is not None and self.layer_idx >= config.first_k_dense_replace:
            self.mlp = DeepseekV2MoE(config, quant, prefix=f"{prefix}.mlp")
        else:
            self.mlp = DeepseekV2MLP(
                config.hidden_size,
                config.intermediate_size,
                quant.linear,
                prefix=f"{prefix}.mlp",
                replicated=quant.replicate_dense_mlp,
                fuse_gate_up=quant.fuses(f"{prefix}.mlp", ["gate_proj", "up_proj"]),
            )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # fp16 overflows with V2's routed_scaling_factor 16: keep the residual stream divided by it (the RMS
        # norms do not see the difference; the MoE runner divides the shared output to match).
        fp16_with_shared = vllm_config.model_config.dtype == torch.float16 and bool(config.n_shared_experts)
        self.fp16_residual_scale = 1.0 / routed_scaling(config) if fp16_with_shared else 1.0

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        if self.fp16_residual_scale != 1.0:
            hidden_states *= self.fp16_residual_scale
            if self.layer_idx == 0:
                residual *= self.fp16_residual_scale
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if self.fp16_residual_scale != 1.0 and isinstance(self.mlp, DeepseekV2MLP):
            hidden_states *= self.fp16_residual_scale
        return hidden_states, residual


@support_torch_compile
class DeepseekV2Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        quant = QuantPlan(vllm_config.quant_config, config, tp)
        self.config = config
        if get_pp_group().is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant.base,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: DeepseekV2DecoderLayer(vllm_config, quant, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = (
            RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if get_pp_group().is_last_rank
            else PPMissingLayer()
        )
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class DeepseekV2ForCausalLM(nn.Module, SupportsPP, SupportsLoRA):
    # Checkpoint modules fused into one parameter (read by quantisation configs when choosing methods).
    packed_modules_mapping = {
        "gate_up_proj": ["gate_proj", "up_proj"],
        "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
        "fused_q_kv_a_proj": ["q_proj", "kv_a_proj_with_mqa"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        parallel = vllm_config.parallel_config
        check_family(config)
        check_parallel(config, parallel.tensor_parallel_size, bool(parallel.enable_expert_parallel))
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = DeepseekV2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, checkpoint: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        group = quant_group_size(self.config) if self.quant_config is not None else None
        return weights.load_weights(
            self,
            checkpoint,
            awq_group_size=group,
            is_pp_missing=lambda name: is_pp_missing_parameter(name, self),
        )
