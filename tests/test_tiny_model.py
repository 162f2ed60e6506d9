"""The tiny checkpoint: deterministic, V2-Lite-shaped, discriminative, loadable by transformers and vLLM."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from server.model.awq import awq_dequantize
from server.tiny_model import AWQ_GROUP_SIZE, YARN, awq_pack, write_tiny_model


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_same_seed_writes_byte_identical_files(tmp_path: Path, tiny_lite_dir: Path) -> None:
    again = write_tiny_model(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(tiny_lite_dir)
    other = write_tiny_model(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_lite_dir)["model.safetensors"]


def test_config_keeps_the_v2_lite_structure(tiny_lite_dir: Path) -> None:
    cfg = json.loads((tiny_lite_dir / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2"
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert cfg["q_lora_rank"] is None
    assert cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64
    # Exact: Python floats (0.707) survive the JSON round trip bit for bit: json writes their repr.
    assert cfg["rope_scaling"] == YARN
    assert cfg["rope_scaling"]["factor"] == 40 and cfg["rope_scaling"]["mscale_all_dim"] == 0.707
    assert cfg["first_k_dense_replace"] == 1
    assert cfg["n_shared_experts"] == 2 and cfg["n_routed_experts"] > cfg["num_experts_per_tok"] == 6
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["norm_topk_prob"]) == ("greedy", "softmax", False)
    assert cfg["num_attention_heads"] == 16
    size = (tiny_lite_dir / "model.safetensors").stat().st_size
    assert size < 16 * 2**20, f"tiny checkpoint is {size} bytes"


def test_v2_variant_has_q_compression_and_group_limited_routing(tiny_v2_dir: Path) -> None:
    cfg = json.loads((tiny_v2_dir / "config.json").read_text())
    assert cfg["q_lora_rank"] and cfg["topk_method"] == "group_limited_greedy"
    assert cfg["n_group"] > cfg["topk_group"] >= 1 and cfg["routed_scaling_factor"] != 1.0


def test_tokenizer_carries_the_deepseek_v2_chat_template(tiny_lite_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lite_dir)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    tok_cfg = json.loads((tiny_lite_dir / "tokenizer_config.json").read_text())
    assert "'Assistant: ' + message['content'] + eos_token" in tok_cfg["chat_template"]
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant:"
    ids = tok("Hello 你好").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 你好"


@pytest.mark.parametrize("variant", ["lite", "v2"])
def test_transformers_loads_every_tensor_and_logits_are_discriminative(
    variant: str, tiny_lite_dir: Path, tiny_v2_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_lite_dir if variant == "lite" else tiny_v2_dir
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor([tok("The quick brown fox").input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        logits = model(ids).logits[0]
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) >= 12, f"greedy output is degenerate: {new}"
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median().item() > 1e-3, f"top-1/top-2 gaps too small: {gaps.tolist()}"


def test_awq_pack_round_trips_within_half_a_step() -> None:
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(0)) * 0.1
    packed = awq_pack(w)
    assert packed["qweight"].shape == (192, 8) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (3, 8) and packed["scales"].shape == (3, 64)
    deq = awq_dequantize(**packed, group_size=AWQ_GROUP_SIZE)
    step = packed["scales"].float().repeat_interleave(64, 0).t()
    # Half a quantisation step, plus 1e-6 for the fp32 rounding of the dequantisation (|w| < 1: ulp ~1e-7).
    assert torch.all((deq - w).abs() <= step * 0.5 + 1e-6)


def test_awq_checkpoint_quantises_layer0_mlp_and_experts(tiny_awq_dir: Path) -> None:
    from safetensors import safe_open

    cfg = json.loads((tiny_awq_dir / "config.json").read_text())
    assert (
        cfg["quantization_config"]["quant_method"] == "awq" and cfg["quantization_config"]["group_size"] == 64
    )
    assert cfg["intermediate_size"] % 128 != 0
    with safe_open(tiny_awq_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for base in (
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.experts.0.gate_proj",
        "model.layers.1.mlp.shared_experts.up_proj",
        "model.layers.0.self_attn.kv_b_proj",
    ):
        assert {f"{base}.qweight", f"{base}.qzeros", f"{base}.scales"} <= names, base
    assert "model.layers.1.mlp.gate.weight" in names  # the router stays unquantised


@pytest.mark.engine
def test_vllm_loads_and_generates_like_transformers(tiny_lite_dir: Path) -> None:
    """The walking skeleton: the real vLLM engine runs the tiny checkpoint, greedy = transformers greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from tests.conftest import FP32_ATTENTION_BACKEND

    tok = AutoTokenizer.from_pretrained(tiny_lite_dir)
    prompt = "Hello world, this is a test"
    ids = torch.tensor([tok(prompt).input_ids])
    ref = AutoModelForCausalLM.from_pretrained(tiny_lite_dir, dtype=torch.float32)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    want = want[0, ids.shape[1] :].tolist()

    llm = LLM(
        str(tiny_lite_dir),
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        attention_backend=FP32_ATTENTION_BACKEND,
    )
    try:
        got = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].token_ids
    finally:
        del llm
    assert list(got) == want


def test_real_width_shapes_are_deepseek_v2_lite() -> None:
    from server.tiny_model import real_width_config, weight_shapes

    cfg = real_width_config()
    shapes = weight_shapes(cfg)
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 102400
    assert shapes["model.embed_tokens.weight"] == (102400, 2048)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16 * (128 + 64), 2048)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (512 + 64, 2048)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (16 * (128 + 128), 512)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 10944)
    assert shapes["model.layers.1.mlp.experts.63.gate_proj.weight"] == (1408, 2048)
    assert shapes["model.layers.1.mlp.shared_experts.down_proj.weight"] == (2048, 2816)
    params = sum(math.prod(s) for s in shapes.values())
    assert 1.0e9 < params < 1.2e9, params


@pytest.mark.parametrize(("group", "down0_quantised"), [(64, True), (128, False)])
def test_awq_plan_leaves_what_autoawq_cannot_quantise(group: int, down0_quantised: bool) -> None:
    from server.tiny_model import awq_plan, real_width_config

    quantised, not_converted = awq_plan(real_width_config(), group)
    assert ("model.layers.0.mlp.down_proj" in quantised) == down0_quantised
    assert not_converted == ([] if down0_quantised else ["model.layers.0.mlp.down_proj"])
    assert "model.layers.1.mlp.experts.0.down_proj" in quantised  # 1408 = 11 x 128
    assert "model.layers.1.mlp.gate" not in quantised
    quantised, not_converted = awq_plan(real_width_config(), group, skip=("kv_a_proj_with_mqa",))
    assert not any("kv_a_proj_with_mqa" in m for m in quantised)
    assert not_converted[0] == "kv_a_proj_with_mqa"
