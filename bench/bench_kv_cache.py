"""KV-cache bytes per token: what the engine allocates, against the MLA minimum and a standard MHA cache.

    .venv/bin/python bench/bench_kv_cache.py [--model DIR] [--kv-cache-dtype auto] [--json PATH]

Starts the engine in-process on the checkpoint (default: the tiny one in .cache/tiny-dsv2, written when
missing), reads the KV cache it built (vLLM's KVCacheConfig: per-group spec page size / block size, and the
tensors it allocated) and compares bytes per token with
  MLA minimum   layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes   (the latent c_KV and the rope key)
  MHA           layers x 2 x heads x d_h x dtype bytes, d_h = qk_nope_head_dim (the DeepSeek-V2 paper's count)
  MHA exact     layers x heads x (qk_nope + qk_rope + v_head_dim) x dtype bytes (K with its rope part, and V)
then prints the same analysis for the published DeepSeek-V2-Lite and DeepSeek-V2 configs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


@dataclass(frozen=True)
class AttentionDims:
    """The numbers that size a DeepSeek-V2 KV cache."""

    name: str
    layers: int
    heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_lora_rank: int

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> AttentionDims:
        return cls(
            name=name,
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            kv_lora_rank=cfg["kv_lora_rank"],
        )

    def mla_bytes(self, dtype_bytes: int) -> int:
        return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes

    def mha_bytes(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.heads * self.qk_nope_head_dim * dtype_bytes

    def mha_exact_bytes(self, dtype_bytes: int) -> int:
        k_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.layers * self.heads * (k_head + self.v_head_dim) * dtype_bytes


# Published configs (config.json of deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V2).
DEEPSEEK_V2_LITE = AttentionDims(
    "DeepSeek-V2-Lite",
    layers=27,
    heads=16,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    kv_lora_rank=512,
)
DEEPSEEK_V2 = AttentionDims(
    "DeepSeek-V2",
    layers=60,
    heads=128,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    kv_lora_rank=512,
)


def engine_kv_cache(model: str, max_model_len: int, kv_cache_dtype: str) -> dict:
    """Build the engine in-process and read back the KV cache it planned and allocated."""
    from vllm import LLM
    from vllm.utils.torch_utils import get_dtype_size

    llm = LLM(model, max_model_len=max_model_len, enforce_eager=True, kv_cache_dtype=kv_cache_dtype)
    client = llm.llm_engine.engine_core
    if not hasattr(client, "engine_core"):
        raise RuntimeError("the engine runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    core = client.engine_core
    config = core.scheduler.kv_cache_config
    vllm_config = llm.llm_engine.vllm_config

    groups = []
    planned = 0  # bytes per token summed over every layer of every group
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        per_layer = spec.page_size_bytes / spec.block_size  # page = block_size tokens of one layer
        planned += per_layer * len(group.layer_names)
        groups.append(
            {
                "spec": type(spec).__name__,
                "layers": len(group.layer_names),
                "block_size": spec.block_size,
                "page_size_bytes": spec.page_size_bytes,
                "num_kv_heads": spec.num_kv_heads,
                "head_size": spec.head_size,
                "dtype": str(spec.dtype).removeprefix("torch."),
                "dtype_bytes": get_dtype_size(spec.dtype),
                "bytes_per_token_per_layer": per_layer,
            }
        )

    # The tensors the attention layers actually hold, e.g. [num_blocks, block_size, 576] per MLA layer.
    tensors = {}
    for name, layer in vllm_config.compilation_config.static_forward_context.items():
        kv = getattr(layer, "kv_cache", None)
        for t in kv if isinstance(kv, list) else [kv]:
            if t is not None and hasattr(t, "shape") and t.numel():
                tensors.setdefault(name, []).append(
                    {"shape": list(t.shape), "bytes": t.numel() * t.element_size()}
                )
    allocated = sum(t.size for t in config.kv_cache_tensors)
    tokens = config.num_blocks * groups[0]["block_size"] if groups else 0
    model_class = type(core.model_executor.driver_worker.worker.model_runner.model)
    cpu_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    return {
        "model_class": f"{model_class.__module__}.{model_class.__name__}",
        "num_blocks": config.num_blocks,
        "capacity_tokens": tokens,
        "allocated_bytes": allocated,
        "configured_bytes": int(float(cpu_space) * GIB) if cpu_space else None,
        "planned_bytes_per_token": planned,
        "allocated_bytes_per_token": allocated / tokens if tokens else None,
        "groups": groups,
        "layer_tensors": {name: ts for name, ts in list(tensors.items())[:1]},  # one is enough: all alike
        "layers_with_cache": len(tensors),
    }


def analyse(dims: AttentionDims, dtype_bytes: int) -> dict:
    mla, mha, exact = (
        dims.mla_bytes(dtype_bytes),
        dims.mha_bytes(dtype_bytes),
        dims.mha_exact_bytes(dtype_bytes),
    )
    return {
        "dims": asdict(dims),
        "dtype_bytes": dtype_bytes,
        "mla_min_bytes_per_token": mla,
        "mha_bytes_per_token": mha,
        "mha_exact_bytes_per_token": exact,
        "mha_over_mla": mha / mla,
        "mha_exact_over_mla": exact / mla,
        "tokens_per_gib": {"mla": GIB // mla, "mha": GIB // mha, "mha_exact": GIB // exact},
    }


def print_analysis(a: dict) -> None:
    d = a["dims"]
    b = a["dtype_bytes"]
    print(
        f"{d['name']}: {d['layers']} layers, {d['heads']} heads, qk {d['qk_nope_head_dim']}+{d['qk_rope_head_dim']}, "
        f"v {d['v_head_dim']}, kv_lora_rank {d['kv_lora_rank']}, {b}-byte elements"
    )
    rows = [
        ("MLA minimum  L*(r_kv+d_rope)*b", a["mla_min_bytes_per_token"], 1.0, a["tokens_per_gib"]["mla"]),
        ("MHA          L*2*H*d_h*b", a["mha_bytes_per_token"], a["mha_over_mla"], a["tokens_per_gib"]["mha"]),
        (
            "MHA exact    L*H*(d_qk+d_v)*b",
            a["mha_exact_bytes_per_token"],
            a["mha_exact_over_mla"],
            a["tokens_per_gib"]["mha_exact"],
        ),
    ]
    for label, nbytes, ratio, per_gib in rows:
        print(f"  {label:<32} {nbytes:>10,} B/token  {ratio:6.2f}x MLA  {per_gib:>10,} tokens/GiB")


def ensure_tiny_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-m", "server", "tiny-model", str(path)], check=True, cwd=REPO)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="Checkpoint directory; default: .cache/tiny-dsv2 (written if missing)."
    )
    parser.add_argument("--max-model-len", type=int, default=512, help="Engine context length.")
    parser.add_argument(
        "--kv-cache-dtype", default="auto", help="vLLM --kv-cache-dtype (auto = the model dtype)."
    )
    parser.add_argument("--json", default=None, help="Also write every number to this JSON file.")
    args = parser.parse_args(argv)

    # In-process engine (the KV cache config lives in the engine core) with a small CPU KV cache.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the report readable
    sys.path.insert(0, str(REPO))  # the plugin's package, when run from a checkout

    model = Path(args.model) if args.model else ensure_tiny_model(REPO / ".cache" / "tiny-dsv2")
    cfg = json.loads((model / "config.json").read_text())
    engine = engine_kv_cache(str(model), args.max_model_len, args.kv_cache_dtype)
    dtype_bytes = engine["groups"][0]["dtype_bytes"]
    served = analyse(AttentionDims.from_config(model.name, cfg), dtype_bytes)

    print(f"engine: {engine['model_class']} on {model}")
    for g in engine["groups"]:
        print(
            f"  {g['spec']}: {g['layers']} layers, block {g['block_size']} tokens, page {g['page_size_bytes']:,} B "
            f"({g['num_kv_heads']} kv head x {g['head_size']} x {g['dtype']}) = {g['bytes_per_token_per_layer']:,.0f} B/token/layer"
        )
    for name, ts in engine["layer_tensors"].items():
        print(
            f"  {name}.kv_cache: {' + '.join(str(t['shape']) for t in ts)} ({engine['layers_with_cache']} such layers)"
        )
    configured = engine["configured_bytes"]
    share = (
        f" of {configured / GIB:g} GiB configured ({engine['allocated_bytes'] / configured:.2%})"
        if configured
        else ""
    )
    print(
        f"  {engine['num_blocks']:,} blocks = {engine['capacity_tokens']:,} tokens, "
        f"{engine['allocated_bytes']:,} B allocated{share}"
    )
    planned, allocated = engine["planned_bytes_per_token"], engine["allocated_bytes_per_token"]
    mla = served["mla_min_bytes_per_token"]
    print(
        f"  bytes/token: spec {planned:,.0f}, allocated {allocated:,.1f}; MLA minimum {mla:,} -> "
        f"engine/minimum {allocated / mla:.3f}x; MHA {served['mha_bytes_per_token']:,} ({served['mha_bytes_per_token'] / allocated:.2f}x "
        f"the engine's), MHA exact {served['mha_exact_bytes_per_token']:,} ({served['mha_exact_bytes_per_token'] / allocated:.2f}x)"
    )
    published = [analyse(dims, 2) for dims in (DEEPSEEK_V2_LITE, DEEPSEEK_V2)]  # bf16, as served
    for a in (served, *published):
        print()
        print_analysis(a)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"engine": engine, "served": served, "published": published}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
