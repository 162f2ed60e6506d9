"""A tiny, deterministic DeepSeek-V2 checkpoint with random weights and a locally trained tokenizer.

It keeps every structural feature of DeepSeek-V2-Lite (MLA with a 512-d latent and a 64-d rope key, YaRN
exactly as V2-Lite's config.json writes it, a dense first layer, 2 shared + routed experts with greedy top-6
softmax routing, no renormalisation) and shrinks everything else, so the real vLLM engine and transformers
can run it on a CPU in seconds. The `v2` variant has the full DeepSeek-V2 layout: q compression and
group-limited routing with a routed scaling factor. `awq=True` writes the linear layers in AutoAWQ's GEMM
layout (4-bit, group size 64), including the routed experts and a layer-0 MLP whose width (192) is not a
multiple of 128.

Same arguments -> byte-identical files.
"""

from __future__ import annotations

import json
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

# std 0.02 (the usual init) makes random-weight logits near-uniform: greedy comparisons would flip on rounding.
INIT_STD = 0.1


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


def tiny_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> fp32 tensors, drawn in a fixed order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * INIT_STD

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk_head = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kv_lora, rope, v_head = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=gen)
    }

    def mlp(prefix: str, inter: int) -> None:
        w[f"{prefix}.gate_proj.weight"] = linear(inter, h)
        w[f"{prefix}.up_proj.weight"] = linear(inter, h)
        w[f"{prefix}.down_proj.weight"] = linear(h, inter)

    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(h)
        if cfg["q_lora_rank"]:
            w[f"{p}.self_attn.q_a_proj.weight"] = linear(cfg["q_lora_rank"], h)
            w[f"{p}.self_attn.q_a_layernorm.weight"] = norm(cfg["q_lora_rank"])
            w[f"{p}.self_attn.q_b_proj.weight"] = linear(heads * qk_head, cfg["q_lora_rank"])
        else:
            w[f"{p}.self_attn.q_proj.weight"] = linear(heads * qk_head, h)
        w[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = linear(kv_lora + rope, h)
        w[f"{p}.self_attn.kv_a_layernorm.weight"] = norm(kv_lora)
        w[f"{p}.self_attn.kv_b_proj.weight"] = linear(heads * (cfg["qk_nope_head_dim"] + v_head), kv_lora)
        w[f"{p}.self_attn.o_proj.weight"] = linear(h, heads * v_head)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
        else:
            w[f"{p}.mlp.gate.weight"] = linear(cfg["n_routed_experts"], h)
            for e in range(cfg["n_routed_experts"]):
                mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
            mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = linear(cfg["vocab_size"], h)
    return w


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
    x = x.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)]
    packed = torch.zeros(r, n // 8, dtype=torch.int64)
    for i in range(8):
        packed |= (x[:, :, i].to(torch.int64) & 0xF) << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _is_awq_target(name: str) -> bool:
    # AutoAWQ quantises every linear of the decoder layers except the router gate.
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


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
) -> Path:
    """Write config, weights, tokenizer and generation config to `out_dir`; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)

    cfg = tiny_config(variant)
    weights = tiny_weights(cfg, seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if awq and _is_awq_target(name):
            base = name[: -len(".weight")]
            for k, v in awq_pack(w).items():
                tensors[f"{base}.{k}"] = v
        else:
            tensors[name] = w.to(torch_dtype).contiguous()
    if awq:
        cfg["torch_dtype"] = "float16"
        cfg["quantization_config"] = {
            "bits": 4,
            "group_size": AWQ_GROUP_SIZE,
            "modules_to_not_convert": None,
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
    tokenizer = train_tokenizer(cfg["vocab_size"])
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
