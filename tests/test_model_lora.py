"""LoRA adapters (`SupportsLoRA`): a peft adapter the project generates (`server.tiny_model.write_tiny_lora`)
served by vLLM on our class gives transformers' greedy tokens, fp32, on the tiny V2-Lite checkpoint.

- An adapter on the attention's q_proj and o_proj equals transformers + peft on the same adapter directory.
- An adapter on every supported linear (also the dense and shared-expert MLPs) equals transformers on the
  merged weights W + (alpha / r) B A. peft 0.21 with transformers 5 cannot be the oracle there: for
  DeepSeek-V2 it maps gate_proj/up_proj/down_proj onto the stacked routed-expert tensors and leaves the dense
  MLP adapters unloaded ("Found missing adapter keys ... mlp.experts.lora_A").
- The routed experts take no LoRA on vLLM's CPU build: with LoRA on, vLLM 0.32 runs every MoE layer through
  its Triton MoE kernel, which the CPU build lacks (AttributeError: module 'triton.language' has no attribute
  'float32'), so our class builds them without LoRA there and limits the adapters' targets to the linears.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FP32_ATTENTION_BACKEND
from tests.model_helpers import (
    assert_same_greedy,
    hf_greedy,
    hf_load_tensors,
    hf_model,
    loaded_model,
    make_llm,
    prompt_ids,
    shutdown,
    vllm_greedy,
)

pytestmark = pytest.mark.engine

ATTENTION_ONLY = ("q_proj", "o_proj")


@pytest.fixture(scope="module")
def adapters(tiny_lite_dir, tmp_path_factory):
    from server.tiny_model import write_tiny_lora

    return {
        "attention": write_tiny_lora(
            tmp_path_factory.mktemp("lora-attn"), tiny_lite_dir, targets=ATTENTION_ONLY
        ),
        "all": write_tiny_lora(tmp_path_factory.mktemp("lora-all"), tiny_lite_dir, seed=2),
    }


@pytest.fixture(scope="module")
def engine(tiny_lite_dir, adapters):
    llm = make_llm(
        tiny_lite_dir,
        dtype="float32",
        attention_backend=FP32_ATTENTION_BACKEND,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
    )
    yield llm
    shutdown(llm)


def _with_adapter(llm, prompts, name: str, lora_id: int, path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=0, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts],
        params,
        lora_request=LoRARequest(name, lora_id, str(path)),
        use_tqdm=False,
    )
    return [
        (
            list(o.outputs[0].token_ids),
            [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)],
        )
        for o in outs
    ]


def _merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The adapted weights W + (alpha / r) B A of every module the adapter touches."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    merged = {}
    for name, a in lora.items():
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[name.replace(".lora_A.", ".lora_B.")]
            merged[f"{module}.weight"] = base[f"{module}.weight"].float() + scale * (b @ a)
    return merged


def test_attention_adapter_matches_transformers_with_peft(engine, tiny_lite_dir, adapters) -> None:
    from peft import PeftModel

    prompts = prompt_ids(tiny_lite_dir)
    got = _with_adapter(engine, prompts, "attention", 1, adapters["attention"])
    model = PeftModel.from_pretrained(hf_model(tiny_lite_dir), str(adapters["attention"])).eval()
    want = hf_greedy(model, prompts)
    base = hf_greedy(hf_model(tiny_lite_dir), prompts)
    assert [t for t, _ in want] != [t for t, _ in base], "the adapter does not change the output"
    worst = assert_same_greedy(got, want, max_logprob_diff=1e-3)
    print(f"LoRA q_proj+o_proj = transformers + peft, max |Δ logprob| {worst:.2e}")


def test_full_adapter_matches_transformers_on_merged_weights(engine, tiny_lite_dir, adapters) -> None:
    prompts = prompt_ids(tiny_lite_dir)
    got = _with_adapter(engine, prompts, "all", 2, adapters["all"])
    model = hf_model(tiny_lite_dir)
    hf_load_tensors(model, _merged(tiny_lite_dir, adapters["all"]))
    worst = assert_same_greedy(got, hf_greedy(model, prompts), max_logprob_diff=1e-3)
    print(f"LoRA on every supported linear = transformers on merged weights, max |Δ logprob| {worst:.2e}")


def test_requests_without_an_adapter_are_the_base_model(engine, tiny_lite_dir) -> None:
    prompts = prompt_ids(tiny_lite_dir)
    want = hf_greedy(hf_model(tiny_lite_dir), prompts)
    assert_same_greedy(vllm_greedy(engine, prompts), want, max_logprob_diff=1e-3)


def test_lora_wraps_the_linears_but_not_the_kv_b_projection_or_the_experts(engine) -> None:
    from vllm.lora.layers import BaseLayerWithLoRA
    from vllm.platforms import current_platform

    model = loaded_model(engine)
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, BaseLayerWithLoRA)}
    assert {"fused_q_kv_a_proj", "o_proj", "gate_up_proj", "down_proj"} <= wrapped, wrapped
    assert "kv_b_proj" not in wrapped
    if current_platform.is_cpu():
        assert "experts" not in wrapped


def test_lora_on_kv_b_proj_is_refused(tiny_lite_dir) -> None:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        str(tiny_lite_dir),
        max_model_len=256,
        enforce_eager=True,
        enable_lora=True,
        lora_target_modules=["kv_b_proj"],
    )
    with pytest.raises(ValueError, match=r"LoRA target modules \['kv_b_proj'\] are not supported"):
        args.create_engine_config()
