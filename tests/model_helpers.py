"""Helpers shared by the tests/test_model_*.py modules (no tests here).

The oracle is transformers' DeepseekV2ForCausalLM, run greedily token by token on the same prompt ids as
vLLM, returning each chosen token's log-probability from the raw logits - what vLLM reports with
`logprobs=0` and the default raw-logprobs mode.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import pytest
import torch

PROMPTS = [
    "The quick brown fox",
    "DeepSeek-V2 is a mixture-of-experts language model. It uses",
    "Hello! How are you today?",
    "Write a short poem about the sea. The waves roll in,",
]
N_TOKENS = 32
MAX_MODEL_LEN = 256
# fp16 activations against an fp32 reference (and vLLM's CPU int4 MoE kernel quantises activations to
# int8): logprobs agree to a few 1e-2, and a greedy step may flip where the reference has a near-tie.
FP16_MAX_LOGPROB_DIFF = 5e-2
FP16_MAX_TIE_GAP = 2e-2


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(p)["input_ids"] for p in PROMPTS]


def make_llm(model_dir: Path, **kwargs):
    """An engine whose core runs in this process (the tests inspect the loaded model); TP workers still
    run in their own processes. vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING only while it builds the engine."""
    import vllm.envs
    from vllm import LLM

    # vLLM caches environment variables once an engine runs; the next engine must see the current ones.
    vllm.envs.disable_envs_cache()
    args = dict(max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0, max_num_seqs=8)
    args.update(kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        return LLM(str(model_dir), **args)


def shutdown(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def loaded_model(llm) -> torch.nn.Module:
    """The model object of an in-process, single-worker engine."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def vllm_greedy(llm, prompts: list[list[int]], n: int = N_TOKENS) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    result = []
    for out in outs:
        c = out.outputs[0]
        result.append(
            (list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)])
        )
    return result


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], n: int = N_TOKENS) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs; `.steps` on the result holds every step's full logprob vector."""
    result = HFGreedy()
    for ids in prompts:
        input_ids = torch.tensor([ids])
        past = None
        tokens: list[int] = []
        logprobs: list[float] = []
        steps: list[torch.Tensor] = []
        for _ in range(n):
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            t = int(lp.argmax())
            tokens.append(t)
            logprobs.append(float(lp[t]))
            steps.append(lp)
            input_ids = torch.tensor([[t]])
        result.append((tokens, logprobs))
        result.steps.append(steps)
    return result


class HFGreedy(list):
    """list[(tokens, logprobs)] plus `steps`: per prompt, per step, the [vocab] logprob vector."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[torch.Tensor]] = []


def hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    from transformers import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def awq_group_size(awq_dir: Path) -> int:
    return int(json.loads((awq_dir / "config.json").read_text())["quantization_config"]["group_size"])


def dequantized_tensors(awq_dir: Path, only_quantized: bool = False) -> dict[str, torch.Tensor]:
    """The AWQ checkpoint's tensors with every (qweight, qzeros, scales) replaced by its fp32 dequantised
    weight; `only_quantized` returns just those."""
    return dict(iter_dequantized(awq_dir, only_quantized))


def iter_dequantized(awq_dir: Path, only_quantized: bool = False):
    """The same, one tensor at a time (a real-width export never holds all its dense weights at once)."""
    from safetensors import safe_open

    from server.model.awq import awq_dequantize

    group = awq_group_size(awq_dir)
    with safe_open(str(awq_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            base, _, part = name.rpartition(".")
            if part == "qweight":
                parts = (f.get_tensor(name), f.get_tensor(f"{base}.qzeros"), f.get_tensor(f"{base}.scales"))
                yield f"{base}.weight", awq_dequantize(*parts, group)
            elif part not in ("qzeros", "scales") and not only_quantized:
                yield name, f.get_tensor(name).float()


def write_dequantized_copy(awq_dir: Path, out_dir: Path) -> Path:
    """The AWQ checkpoint with every (qweight, qzeros, scales) replaced by its fp32 dequantised weight."""
    import shutil

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in awq_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out_dir / f.name)
    save_file(dequantized_tensors(awq_dir), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((awq_dir / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def awq_reference(awq_dir: Path, work_dir: Path) -> tuple[list[list[int]], HFGreedy]:
    """Prompt ids and transformers' fp32 greedy output on the AWQ checkpoint's dequantised weights."""
    dense_dir = write_dequantized_copy(awq_dir, work_dir)
    prompts = prompt_ids(awq_dir)
    return prompts, hf_greedy(hf_model(dense_dir, torch.float32), prompts)


def assert_same_greedy(
    got: list[tuple[list[int], list[float]]],
    want: list[tuple[list[int], list[float]]],
    max_logprob_diff: float,
) -> float:
    """Identical tokens for every prompt, and chosen-token logprobs within `max_logprob_diff`."""
    worst = 0.0
    for i, ((g_tok, g_lp), (w_tok, w_lp)) in enumerate(zip(got, want, strict=True)):
        assert g_tok == w_tok, f"prompt {i}: tokens differ\n vllm {g_tok}\n   hf {w_tok}"
        worst = max(worst, max(abs(a - b) for a, b in zip(g_lp, w_lp, strict=True)))
    assert worst <= max_logprob_diff, f"max |Δ logprob| {worst:.2e} > {max_logprob_diff}"
    return worst


def assert_greedy_agrees(
    got: list[tuple[list[int], list[float]]],
    want: HFGreedy,
    max_logprob_diff: float,
    max_tie_gap: float,
) -> tuple[float, int]:
    """For reduced precision: tokens identical until, at most, a near-tie in the reference.

    Where vLLM picks another token than transformers, transformers must rate the two within `max_tie_gap`
    (a rounding-level tie); the sequences differ from there on, so the comparison of that prompt stops.
    Returns the worst logprob difference and the number of tokens compared.
    """
    worst, compared = 0.0, 0
    for i, ((g_tok, g_lp), (w_tok, w_lp)) in enumerate(zip(got, want, strict=True)):
        for j, (a, b) in enumerate(zip(g_tok, w_tok, strict=True)):
            if a != b:
                gap = float(want.steps[i][j][b] - want.steps[i][j][a])
                assert gap <= max_tie_gap, (
                    f"prompt {i} step {j}: vllm chose {a}, hf {b}; hf rates them {gap:.3f} apart"
                    f"\n vllm {g_tok}\n   hf {w_tok}"
                )
                break
            worst = max(worst, abs(g_lp[j] - w_lp[j]))
            compared += 1
    assert worst <= max_logprob_diff, f"max |Δ logprob| {worst:.2e} > {max_logprob_diff}"
    return worst, compared


_HF_EXPERT = re.compile(r"^(?P<moe>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


@torch.no_grad()
def hf_load_tensors(model, tensors) -> None:
    """Copy checkpoint-named tensors into a loaded transformers model in place. Transformers keeps each MoE
    layer's experts as two stacked tensors: gate_up_proj [E, 2 * inter, hidden] (gate rows first) and
    down_proj [E, hidden, inter]."""
    params = dict(model.named_parameters())
    for name, t in tensors.items() if isinstance(tensors, dict) else tensors:
        m = _HF_EXPERT.match(name)
        if m is None:
            params[name].copy_(t)
            continue
        e = int(m["expert"])
        if m["proj"] == "down":
            params[f"{m['moe']}.down_proj"][e].copy_(t)
        else:
            inter = t.shape[0]
            rows = slice(0, inter) if m["proj"] == "gate" else slice(inter, 2 * inter)
            params[f"{m['moe']}.gate_up_proj"][e, rows].copy_(t)
