"""Checkpoint tensor names -> model parameters, and the one loop that loads them.

Hugging Face names differ from ours in three ways, each a table below:
- stacked projections: gate_proj/up_proj -> gate_up_proj, and the projections of the attention input
  (q_a_proj or q_proj, with kv_a_proj_with_mqa) -> one replicated GEMM where the model builds one;
- routed experts: mlp.experts.{e}.{gate,up,down}_proj -> FusedMoE's w13 (gate = w1, up = w3) / w2 tensors,
  expert e;
- everything else maps to the parameter of the same name.
The same tables serve AWQ checkpoints: `x.qweight/qzeros/scales` land in the quantised layer's parameters
of those names, or - for a layer built unquantised (no int4 kernel here, see awq.py) - are dequantised into
its `weight`. A tensor that maps to no parameter, or to one already loaded, is an error that names it; vLLM's
loader then checks that every parameter was loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from server.model.awq import AWQ_PARTS, awq_dequantize

# (parameter module, checkpoint module, shard id)
STACKED: tuple[tuple[str, str, int], ...] = (
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
    ("fused_qkv_a_proj", "q_a_proj", 0),  # V2: q compressed
    ("fused_qkv_a_proj", "kv_a_proj_with_mqa", 1),
    ("fused_q_kv_a_proj", "q_proj", 0),  # V2-Lite at TP=1
    ("fused_q_kv_a_proj", "kv_a_proj_with_mqa", 1),
)

# checkpoint projection of a routed expert -> (FusedMoE tensor stem, shard id)
EXPERT_PROJ: dict[str, tuple[str, str]] = {
    "gate_proj": ("w13", "w1"),
    "up_proj": ("w13", "w3"),
    "down_proj": ("w2", "w2"),
}
_EXPERT_NAME = re.compile(r"^(?P<moe>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+_proj)\.(?P<kind>\w+)$")

# Buffers some exporters write next to the weights; vLLM recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, and for fused parameters the shard / expert."""

    param: str
    shard: int | str | None = None
    expert: int | None = None


def resolve(name: str, params: dict[str, nn.Parameter]) -> Target:
    """The parameter a checkpoint tensor maps to (which may not exist: the caller decides)."""
    m = _EXPERT_NAME.match(name)
    if m and m["proj"] in EXPERT_PROJ:
        stem, shard = EXPERT_PROJ[m["proj"]]
        return Target(f"{m['moe']}.routed_experts.{stem}_{m['kind']}", shard, int(m["expert"]))
    for param_module, ckpt_module, shard in STACKED:
        key = f".{ckpt_module}."
        if key in name:
            stacked = name.replace(key, f".{param_module}.")
            if stacked in params:  # the attention-input fusions exist only in some layouts
                return Target(stacked, shard)
    return Target(name)


def dequantize_awq_stream(
    weights: Iterable[tuple[str, torch.Tensor]],
    params: dict[str, nn.Parameter],
    group_size: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, except AWQ triples whose layer was built dense: those become `<base>.weight`.

    Safetensors files are sorted by name, so a triple arrives together and at most one is buffered.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        base, _, part = name.rpartition(".")
        if part in AWQ_PARTS and _built_dense(base, params):
            parts = pending.setdefault(base, {})
            parts[part] = tensor
            if len(parts) == len(AWQ_PARTS):
                del pending[base]
                yield f"{base}.weight", awq_dequantize(**parts, group_size=group_size)
            continue
        yield name, tensor
    if pending:
        missing = {base: sorted(set(AWQ_PARTS) - set(parts)) for base, parts in pending.items()}
        raise ValueError(f"dsv2-serve: incomplete AWQ tensors in the checkpoint: {missing}")


def _built_dense(base: str, params: dict[str, nn.Parameter]) -> bool:
    return (
        resolve(f"{base}.qweight", params).param not in params
        and resolve(f"{base}.weight", params).param in params
    )


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    awq_group_size: int | None,
    is_pp_missing: Callable[[str], bool],
) -> set[str]:
    """Load every checkpoint tensor into exactly one parameter (or shard of one); returns the names loaded."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(model.named_parameters())
    if awq_group_size:
        weights = dequantize_awq_stream(weights, params, awq_group_size)
    loaded: set[str] = set()
    seen: set[Target] = set()
    for name, tensor in weights:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if is_pp_missing(name):
            continue  # this layer lives on another pipeline stage
        target = resolve(name, params)
        param = params.get(target.param)
        if param is None:
            raise ValueError(
                f"dsv2-serve: checkpoint tensor {name!r} maps to no parameter of the model "
                f"(looked for {target.param!r})"
            )
        if target in seen:
            raise ValueError(f"dsv2-serve: checkpoint tensor {name!r} loads {target} a second time")
        seen.add(target)
        if target.expert is not None:
            # False: with expert parallelism this expert lives on another rank.
            param.weight_loader(
                param,
                tensor,
                target.param,
                shard_id=target.shard,
                expert_id=target.expert,
                return_success=True,
            )
        elif target.shard is not None:
            param.weight_loader(param, tensor, target.shard)
        else:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        loaded.add(target.param)
    return loaded
