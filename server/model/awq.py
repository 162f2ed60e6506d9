"""AWQ 4-bit: which layers keep vLLM's int4 kernels on this platform, and the load-time dequantisation
for the layers that cannot.

vLLM serves AutoAWQ checkpoints through `AutoAWQConfig`: Marlin / AWQ GEMM and the WNA16 MoE kernels on
GPUs, `cpu_gemm_wna16` (compiled only into the AVX-512 builds of the CPU extension) for linears and
`CPUExpertsInt4` (AMX tiles) for experts on x86 CPUs. Where a kernel is missing we build that layer
unquantised and the weight loader turns each (qweight, qzeros, scales) triple into a dense weight, so an
AWQ checkpoint serves on every platform vLLM runs on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

AWQ_PARTS = ("qweight", "qzeros", "scales")
# AutoAWQ stores the 8 nibbles of an int32 in this column order.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class Int4Kernels:
    """Whether vLLM has an int4 kernel for AWQ linears / AWQ experts on the current platform."""

    linear: bool
    moe: bool


def _cpu_op_exists(name: str) -> bool:
    try:
        getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def detect_int4_kernels() -> Int4Kernels:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        # CUDA/ROCm/XPU builds ship AWQ GEMM and WNA16 MoE kernels for every AWQ shape vLLM accepts.
        return Int4Kernels(linear=True, moe=True)
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4

    return Int4Kernels(
        # Only the AVX-512 (and AMX) builds of vLLM's CPU extension register this op; AVX2 builds do not.
        linear=_cpu_op_exists("cpu_gemm_wna16"),
        moe=CPUExpertsInt4._supports_current_device(),
    )


_logged = False


def plan_int4_kernels(force_dequant: bool = False) -> Int4Kernels:
    """The kernels this process will use for an AWQ checkpoint; logs once what gets dequantised."""
    global _logged
    kernels = Int4Kernels(False, False) if force_dequant else detect_int4_kernels()
    if not _logged and not (kernels.linear and kernels.moe):
        _logged = True
        which = {
            (False, False): "all AWQ layers",
            (False, True): "the AWQ linear layers",
            (True, False): "the AWQ routed experts",
        }[(kernels.linear, kernels.moe)]
        reason = (
            "DSV2_AWQ_DEQUANTIZE=1" if force_dequant else "vLLM has no int4 kernel for them on this platform"
        )
        logger.warning(
            "dsv2-serve: dequantising %s to the model dtype at load time (%s); "
            "weights take 4x the memory of int4.",
            which,
            reason,
        )
    return kernels


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 holding 8 nibbles each (AutoAWQ order) -> [R, 8C] integers 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [R, C, 8], nibble i at bits 4i
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles  # nibble i holds column AWQ_ORDER[i]
    return out.reshape(packed.shape[0], -1)


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """AutoAWQ GEMM layout -> the dense [out, in] fp32 weight: W^T[k, n] = (q[k, n] - z[k/g, n]) * s[k/g, n]."""
    q = _unpack_int4(qweight).float()  # [K, N]
    z = _unpack_int4(qzeros).float()  # [K/g, N]
    k = q.shape[0]
    if z.shape[0] * group_size != k or scales.shape[0] * group_size != k:
        raise ValueError(
            f"AWQ tensors do not match group_size={group_size}: qweight {tuple(qweight.shape)}, "
            f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    s = scales.float()
    w = (q.view(-1, group_size, q.shape[1]) - z[:, None, :]) * s[:, None, :]  # [K/g, g, N]
    return w.reshape(k, -1).t().contiguous()
