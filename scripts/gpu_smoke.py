"""The Python half of scripts/gpu-smoke.sh: transformers references and vLLM runs compared token by token.

    python scripts/gpu_smoke.py reference --model DIR --out REF.json [--tokens N] [--device cuda|cpu] [--lora A]
    python scripts/gpu_smoke.py run --model DIR --ref REF.json --case NAME [--tp N] [--dtype D] [--eager] [--lora A]

`reference` runs transformers in fp32 greedily (an AWQ export on its dequantised weights; with --lora, on the
weights merged with the peft adapter A: W + (alpha / r) B A) and writes the prompt ids, the chosen tokens and
every step's top-2 log-probability gap. `run` serves the checkpoint with vLLM as a GPU runs it by default
(torch.compile and CUDA graphs, unless --eager; with --lora, through vLLM's LoRA layers with adapter A), greedy,
and prints one line:

    <case>: OK   <n> tokens identical ...        or        <case>: MISMATCH prompt i step j ...

Reduced precision may pick another token only where the fp32 reference has a near-tie (top-2 log-probs within
--tie-gap); from there the sequences differ, so that prompt's comparison stops. Exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "The quick brown fox",
    "DeepSeek-V2 is a mixture-of-experts language model. It uses",
    "Hello! How are you today?",
    "Write a short poem about the sea. The waves roll in,",
]


def prompt_ids(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(p)["input_ids"] for p in PROMPTS]


def _hf_model(model_dir: str, device: str, work: Path):
    """transformers' DeepseekV2ForCausalLM in fp32; an AWQ export as a dequantised copy written to `work`."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("quantization_config"):
        model_dir = str(dequantized_copy(Path(model_dir), work / "dequantized"))
    return DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def dequantized_copy(awq_dir: Path, out: Path) -> Path:
    """The AWQ export with every (qweight, qzeros, scales) turned into its fp32 weight, unquantised config."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from server.model.awq import awq_dequantize

    config = json.loads((awq_dir / "config.json").read_text())
    group = int(config.pop("quantization_config")["group_size"])
    config["torch_dtype"] = "float32"
    out.mkdir(parents=True, exist_ok=True)
    for f in awq_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in sorted(awq_dir.glob("*.safetensors")):
        tensors = load_file(str(f))
        dense: dict[str, torch.Tensor] = {}
        for name in sorted(tensors):
            base, _, part = name.rpartition(".")
            if part == "qweight":
                parts = (tensors[name], tensors[f"{base}.qzeros"], tensors[f"{base}.scales"])
                dense[f"{base}.weight"] = awq_dequantize(*parts, group)
            elif part not in ("qzeros", "scales"):
                dense[name] = tensors[name].float()
        save_file(dense, str(out / f.name), metadata={"format": "pt"})
    return out


def merge_lora(model, adapter_dir: Path) -> int:
    """Add a peft LoRA adapter into the model's weights in place (W += alpha / r * B A); returns how many."""
    import torch
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = 0
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            weight = model.get_parameter(f"{module}.weight")
            weight += scale * (b.float() @ a.float()).to(weight.device)
            merged += 1
    return merged


def reference(model_dir: str, n_tokens: int, device: str, work: Path, lora: str | None = None) -> dict:
    import torch

    model = _hf_model(model_dir, device, work)
    if lora:
        merge_lora(model, Path(lora))
    prompts = prompt_ids(model_dir)
    tokens, gaps = [], []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids], device=device)
            past, toks, step_gaps = None, [], []
            for _ in range(n_tokens):
                out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                top = lp.topk(2)
                toks.append(int(top.indices[0]))
                step_gaps.append(float(top.values[0] - top.values[1]))
                input_ids = torch.tensor([[toks[-1]]], device=device)
            tokens.append(toks)
            gaps.append(step_gaps)
    return {"model": model_dir, "lora": lora, "prompts": prompts, "tokens": tokens, "gaps": gaps}


def compare(got: list[list[int]], ref: dict, tie_gap: float) -> tuple[bool, str]:
    """(ok, one-line summary): identical tokens, except where the reference has a near-tie."""
    identical = compared = 0
    for i, (g, w) in enumerate(zip(got, ref["tokens"], strict=True)):
        for j, (a, b) in enumerate(zip(g, w, strict=True)):
            if a != b:
                gap = ref["gaps"][i][j]
                if gap > tie_gap:
                    return (
                        False,
                        f"MISMATCH prompt {i} step {j}: vllm {a}, transformers {b} (top-2 gap {gap:.3f})",
                    )
                break
            compared += 1
        identical += g == w
    total = sum(len(t) for t in ref["tokens"])
    if compared < total // 2:
        return False, f"MISMATCH only {compared}/{total} tokens before near-ties"
    return True, f"OK   {identical}/{len(got)} prompts identical, {compared}/{total} tokens compared"


def run(args: argparse.Namespace) -> int:
    from vllm import LLM, SamplingParams

    ref = json.loads(Path(args.ref).read_text())
    if (ref.get("lora") is None) != (args.lora is None):
        print(f"{args.case}: FAILED the reference was made {'with' if ref.get('lora') else 'without'} --lora")
        return 1
    lora_args, lora_request = {}, None
    if args.lora:
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks
        from vllm.lora.request import LoRARequest

        rank = json.loads((Path(args.lora) / "adapter_config.json").read_text())["r"]
        lora_args = {"enable_lora": True, "max_lora_rank": min(r for r in get_args(MaxLoRARanks) if r >= rank)}
        lora_request = LoRARequest("smoke", 1, str(Path(args.lora).resolve()))
    llm = LLM(
        args.model,
        tensor_parallel_size=args.tp,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=0,
        **lora_args,
    )
    n = len(ref["tokens"][0])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in ref["prompts"]], params, lora_request=lora_request, use_tqdm=False
    )
    ok, line = compare([list(o.outputs[0].token_ids) for o in outs], ref, args.tie_gap)
    print(f"{args.case}: {line}", flush=True)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reference", help="transformers fp32 greedy reference -> JSON")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--device", default=None, help="cuda when available, else cpu")
    r.add_argument("--lora", default=None, help="a peft LoRA adapter directory, merged into the weights")
    v = sub.add_parser("run", help="vLLM greedy vs a reference; one line, exit 1 on a mismatch")
    v.add_argument("--model", required=True)
    v.add_argument("--ref", required=True)
    v.add_argument("--case", required=True, help="name printed on the result line")
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--dtype", default="bfloat16")
    v.add_argument("--eager", action="store_true", help="enforce_eager (default: compile + CUDA graphs)")
    v.add_argument("--tie-gap", type=float, default=0.1, help="top-2 log-prob gap counted as a near-tie")
    v.add_argument("--max-model-len", type=int, default=512)
    v.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    v.add_argument("--lora", default=None, help="a peft LoRA adapter directory, served through vLLM's LoRA")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "reference":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        out = Path(args.out)
        out.write_text(json.dumps(reference(args.model, args.tokens, device, out.parent, args.lora)) + "\n")
        print(f"reference: {args.model} on {device} -> {args.out}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
