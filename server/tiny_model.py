"""A tiny, deterministic DeepSeek-V2 checkpoint with random weights and a locally trained tokenizer.

It keeps every structural feature of DeepSeek-V2-Lite (MLA with a 512-d latent and a 64-d rope key, YaRN
exactly as V2-Lite's config.json writes it, a dense first layer, 2 shared + routed experts with greedy top-6
softmax routing, no renormalisation) and shrinks everything else, so the real vLLM engine and transformers
can run it on a CPU in seconds. The `v2` variant has the full DeepSeek-V2 layout: q compression and
group-limited routing with a routed scaling factor. `awq=True` writes the linear layers in AutoAWQ's GEMM
layout (4-bit, group size 64 or 128), including the routed experts and a layer-0 MLP whose width (192) is
not a multiple of 128; a linear whose input width the group size does not divide stays unquantised, as
AutoAWQ leaves it, and `awq_skip` leaves more (AutoAWQ's `modules_to_not_convert`).

`real_widths=True` keeps DeepSeek-V2-Lite's true shapes (hidden 2048, 16 heads of 128 + 64, 64 routed
experts x 1408, a 10944-wide dense layer 0, vocabulary 102400) with only 2 layers: about 1.1 B parameters,
2.2 GB in bf16. Its weights are drawn with a standard deviation scaled by 1/sqrt(fan-in) so that every layer
has the tiny model's gain; the tokenizer is the tiny one (1024 tokens), the model's vocabulary the real one.

Same arguments -> byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.model.awq import AWQ_ORDER

DATA = Path(__file__).parent / "data"
CHAT_TEMPLATE = (DATA / "deepseek_v2_chat_template.jinja").read_text()
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# V2-Lite's rope_scaling, verbatim.
YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}

AWQ_GROUP_SIZE = 64
AWQ_GROUP_SIZES = (64, 128)

# std 0.02 (the usual init) makes random-weight logits near-uniform: greedy comparisons would flip on rounding.
INIT_STD = 0.1
# Real widths keep the tiny model's per-layer gain: std = INIT_STD * sqrt(TINY_HIDDEN / fan_in).
TINY_HIDDEN = 128
REAL_WIDTH_LAYERS = 2
# The locally trained tokenizer never grows past this (a real-width model has a larger vocabulary).
TOKENIZER_VOCAB = 1024


def tiny_config(variant: str = "lite", vocab_size: int = 1024) -> dict:
    """config.json of the tiny model. `lite` = DeepSeek-V2-Lite layout, `v2` = full DeepSeek-V2 layout."""
    if variant not in ("lite", "v2"):
        raise ValueError(f"variant must be 'lite' or 'v2', got {variant!r}")
    full = variant == "v2"
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 128,
        "initializer_range": INIT_STD,
        "intermediate_size": 192,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 128,
        "moe_layer_freq": 1,
        "n_group": 4 if full else 1,
        "n_routed_experts": 16,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 3,
        "num_key_value_heads": 16,
        "pretraining_tp": 1,
        "q_lora_rank": 192 if full else None,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(YARN),
        "rope_theta": 10000,
        "routed_scaling_factor": 16.0 if full else 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 2 if full else 1,
        "topk_method": "group_limited_greedy" if full else "greedy",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": vocab_size,
    }


def real_width_config(layers: int = REAL_WIDTH_LAYERS) -> dict:
    """DeepSeek-V2-Lite's config.json shapes with `layers` layers (the first dense, the rest MoE)."""
    if layers < 2:
        raise ValueError(f"a real-width checkpoint needs >= 2 layers (one dense, one MoE), got {layers}")
    cfg = tiny_config("lite", vocab_size=102400)
    cfg.update(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_hidden_layers=layers,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )
    return cfg


def tiny_weights(cfg: dict, seed: int, fan_in_scaled: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> fp32 tensors, drawn in a fixed order from one seeded generator."""
    return dict(iter_weights(cfg, seed, fan_in_scaled))


def iter_weights(
    cfg: dict, seed: int, fan_in_scaled: bool = False, meta: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The same tensors one at a time (a real-width checkpoint never holds all of them in fp32).

    `meta=True` under `torch.device("meta")` yields shapes only."""
    gen = None if meta else torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        std = INIT_STD * (TINY_HIDDEN / in_features) ** 0.5 if fan_in_scaled else INIT_STD
        return torch.randn(out_features, in_features, generator=gen) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kv_lora, rope, v_head = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    yield "model.embed_tokens.weight", torch.randn(cfg["vocab_size"], h, generator=gen)

    def mlp(prefix: str, inter: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{prefix}.gate_proj.weight", linear(inter, h)
        yield f"{prefix}.up_proj.weight", linear(inter, h)
        yield f"{prefix}.down_proj.weight", linear(h, inter)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", norm(h)
        if cfg["q_lora_rank"]:
            yield f"{p}.self_attn.q_a_proj.weight", linear(cfg["q_lora_rank"], h)
            yield f"{p}.self_attn.q_a_layernorm.weight", norm(cfg["q_lora_rank"])
            yield f"{p}.self_attn.q_b_proj.weight", linear(heads * qk_head, cfg["q_lora_rank"])
        else:
            yield f"{p}.self_attn.q_proj.weight", linear(heads * qk_head, h)
        yield f"{p}.self_attn.kv_a_proj_with_mqa.weight", linear(kv_lora + rope, h)
        yield f"{p}.self_attn.kv_a_layernorm.weight", norm(kv_lora)
        yield f"{p}.self_attn.kv_b_proj.weight", linear(heads * (cfg["qk_nope_head_dim"] + v_head), kv_lora)
        yield f"{p}.self_attn.o_proj.weight", linear(h, heads * v_head)
        yield f"{p}.post_attention_layernorm.weight", norm(h)
        if i < cfg["first_k_dense_replace"]:
            yield from mlp(f"{p}.mlp", cfg["intermediate_size"])
        else:
            yield f"{p}.mlp.gate.weight", linear(cfg["n_routed_experts"], h)
            for e in range(cfg["n_routed_experts"]):
                yield from mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
            yield from mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    yield "model.norm.weight", norm(h)
    yield "lm_head.weight", linear(cfg["vocab_size"], h)


def awq_pack(w: torch.Tensor, group_size: int = AWQ_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """Quantise a [out, in] weight to AutoAWQ's GEMM layout.

    Returns qweight [in, out/8] int32, qzeros [in/g, out/8] int32 and scales [in/g, out] fp16, such that
    W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n]; `server.model.awq.awq_dequantize` inverts it.
    """
    out_f, in_f = w.shape
    if in_f % group_size or out_f % 8:
        raise ValueError(f"AWQ needs in % {group_size} == 0 and out % 8 == 0, got {tuple(w.shape)}")
    wt = w.t().reshape(in_f // group_size, group_size, out_f)  # [G, g, N]
    lo, hi = wt.amin(dim=1), wt.amax(dim=1)  # [G, N]
    scales = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(wt / s[:, None, :] + zeros[:, None, :]).clamp(0, 15).to(torch.int32)  # [G, g, N]
    return {
        "qweight": _pack_cols(q.reshape(in_f, out_f)),
        "qzeros": _pack_cols(zeros.to(torch.int32)),
        "scales": scales,
    }


def _pack_cols(x: torch.Tensor) -> torch.Tensor:
    """[R, N] nibbles -> [R, N/8] int32, AutoAWQ's interleaved order."""
    r, n = x.shape
    x = x.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)].to(torch.int64) & 0xF  # [R, N/8, 8]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (x << shifts).sum(dim=-1)  # the nibbles do not overlap: the sum is their bitwise or
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _is_awq_target(name: str) -> bool:
    # AutoAWQ quantises every linear of the decoder layers except the router gate.
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def awq_plan(cfg: dict, group_size: int, skip: tuple[str, ...] = ()) -> tuple[set[str], list[str]]:
    """(the modules an AutoAWQ export quantises, its `modules_to_not_convert`).

    A linear stays in fp16 when its name contains one of `skip` (AutoAWQ's `modules_to_not_convert`), or when
    `group_size` does not divide its input width (AutoAWQ cannot quantise it: V2-Lite's 10944-wide layer-0
    `down_proj` at group 128); the latter are listed by full module name.
    """
    quantised, forced = set(), []
    for name, shape in weight_shapes(cfg).items():
        if not _is_awq_target(name):
            continue
        module = name[: -len(".weight")]
        if any(pattern in module for pattern in skip):
            continue
        if shape[1] % group_size:
            forced.append(module)
            continue
        quantised.add(module)
    return quantised, [*skip, *forced]


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, without drawing anything (meta tensors)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in iter_weights(cfg, 0, meta=True)}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the corpus shipped with the package; BOS/EOS as DeepSeek-V2 spells them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (DATA / "corpus.txt").read_text()
    tok.train_from_iterator([line for line in text.splitlines() if line] * 4, trainer=trainer)
    # BOS once at the start of every encoding, as the real tokenizer does (add_bos_token=True).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=16384,
        clean_up_tokenization_spaces=False,
    )


def write_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    variant: str = "lite",
    awq: bool = False,
    dtype: str = "bfloat16",
    real_widths: bool = False,
    layers: int | None = None,
    awq_group_size: int = AWQ_GROUP_SIZE,
    awq_skip: tuple[str, ...] = (),
) -> Path:
    """Write config, weights, tokenizer and generation config to `out_dir`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if awq_group_size not in AWQ_GROUP_SIZES:
        raise ValueError(f"awq_group_size must be one of {AWQ_GROUP_SIZES}, got {awq_group_size}")
    if real_widths and variant != "lite":
        raise ValueError("real widths are DeepSeek-V2-Lite's: variant must be 'lite'")
    torch_dtype = getattr(torch, dtype)

    if real_widths:
        cfg = real_width_config(layers or REAL_WIDTH_LAYERS)
    else:
        cfg = tiny_config(variant)
        if layers is not None:
            cfg["num_hidden_layers"] = layers
    quantised, not_converted = awq_plan(cfg, awq_group_size, tuple(awq_skip)) if awq else (set(), [])
    tensors: dict[str, torch.Tensor] = {}
    for name, w in iter_weights(cfg, seed, fan_in_scaled=real_widths):
        base = name[: -len(".weight")]
        if base in quantised:
            for k, v in awq_pack(w, awq_group_size).items():
                tensors[f"{base}.{k}"] = v
        else:
            tensors[name] = w.to(torch_dtype).contiguous()
        del w
    if awq:
        cfg["torch_dtype"] = "float16"
        cfg["quantization_config"] = {
            "bits": 4,
            "group_size": awq_group_size,
            "modules_to_not_convert": not_converted or None,
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        }
    else:
        cfg["torch_dtype"] = dtype

    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.3, "top_p": 0.95},
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    tokenizer = train_tokenizer(min(cfg["vocab_size"], TOKENIZER_VOCAB))
    tokenizer.save_pretrained(str(out))
    # Written by hand, as DeepSeek-V2-Chat's is: the chat template lives in tokenizer_config.json, and the
    # class name is one every transformers version knows.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": BOS,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "eos_token": EOS,
                "model_max_length": 16384,
                "pad_token": EOS,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
            sort_keys=True,
            ensure_ascii=False,
        )
        + "\n"
    )
    return out


# Modules a LoRA adapter of the tiny model adapts: the attention's q and output projections and the dense and
# shared-expert MLPs. Not kv_b_proj (MLA absorbs it into the query and output at load time) and not the
# routed experts (transformers keeps them as stacked tensors that peft's LoRA does not target).
LORA_TARGETS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_tiny_lora(
    out_dir: str | Path,
    base_dir: str | Path,
    seed: int = 1,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """A peft LoRA adapter (adapter_config.json + adapter_model.safetensors) for the checkpoint in `base_dir`,
    with random A and B large enough to change greedy output."""
    from safetensors import safe_open

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(base_dir) / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
        for name in names:
            module, _, part = name.rpartition(".")
            if part != "weight" or ".experts." in module or module.rpartition(".")[2] not in targets:
                continue
            out_f, in_f = f.get_slice(name).get_shape()
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * in_f**-0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * rank**-0.5
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": str(base_dir),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
