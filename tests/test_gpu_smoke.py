"""scripts/gpu-smoke.sh cannot run here (no GPU); its CPU-side parts can: argument handling and the plan it
prints, and the transformers references and token comparison in scripts/gpu_smoke.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-smoke.sh"


def _smoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.parametrize(("gpus", "tps"), [("1", ["1"]), ("2", ["1", "2"]), ("8", ["1", "2"])])
def test_dry_run_plans_every_case_at_the_tp_sizes_the_gpus_allow(gpus: str, tps: list[str]) -> None:
    r = _smoke("--dry-run", "--gpus", gpus, "--work", "/w", "--venv", "/v")
    assert r.returncode == 0, r.stderr
    cases = [
        line.split(":")[0].removeprefix("case ") for line in r.stdout.splitlines() if line.startswith("case ")
    ]
    assert cases == [f"{c}-tp{tp}" for c in ("tiny", "real", "awq", "lora") for tp in tps]
    assert "install: python3 -m venv /v && /v/bin/python -m pip install -e '.[cuda]'" in r.stdout
    assert "checkpoint real: /v/bin/python -m server tiny-model /w/real --real-widths" in r.stdout
    assert (
        "checkpoint awq: /v/bin/python -m server tiny-model /w/awq --real-widths --awq --awq-group-size 64"
        in r.stdout
    )
    assert "adapter lora: /v/bin/python -m server tiny-lora /w/lora-adapter --base /w/lora" in r.stdout
    assert (
        "reference lora: /v/bin/python scripts/gpu_smoke.py reference --model /w/lora --out /w/lora.ref.json "
        "--tokens 32 --lora /w/lora-adapter" in r.stdout
    )
    assert all(
        line.endswith("--lora /w/lora-adapter") for line in r.stdout.splitlines() if "case lora-" in line
    )
    assert "--eager" not in r.stdout  # the compiled path with CUDA graphs, vLLM's default


def test_dry_run_options() -> None:
    r = _smoke("--dry-run", "--gpus", "1", "--cases", "tiny", "--tokens", "8", "--skip-install", "--eager")
    assert r.returncode == 0, r.stderr
    assert "install:" not in r.stdout
    assert "--tokens 8" in r.stdout
    cases = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("case ")]
    assert cases == ["case tiny-tp1", "case tiny-tp1-eager"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "no NVIDIA GPU found"),
        (["--cases", "tiny,huge"], "unknown case 'huge'"),
        (["--tokens", "many"], "--tokens must be a positive integer"),
        (["--frobnicate"], "unknown argument: --frobnicate"),
    ],
)
def test_bad_arguments_exit_2_saying_why(args: list[str], message: str) -> None:
    r = _smoke("--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the real thing")
def test_no_gpu_here_is_refused_without_installing_anything(tmp_path) -> None:
    r = subprocess.run(
        ["bash", str(SCRIPT), "--venv", str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},  # no nvidia-smi on this PATH
    )
    assert r.returncode == 2 and "no NVIDIA GPU found" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_compare_allows_only_reference_near_ties() -> None:
    smoke = _module()
    ref = {"tokens": [[1, 2, 3, 4], [5, 6, 7, 8]], "gaps": [[1.0, 1.0, 1.0, 1.0], [1.0, 0.05, 1.0, 1.0]]}
    ok, line = smoke.compare([[1, 2, 3, 4], [5, 6, 7, 8]], ref, tie_gap=0.1)
    assert ok and line.startswith("OK   2/2 prompts identical, 8/8 tokens")
    ok, line = smoke.compare([[1, 2, 3, 4], [5, 9, 9, 9]], ref, tie_gap=0.1)  # near-tie at step 1
    assert ok and "5/8 tokens compared" in line
    ok, line = smoke.compare([[1, 2, 9, 4], [5, 6, 7, 8]], ref, tie_gap=0.1)
    assert not ok and line.startswith("MISMATCH prompt 0 step 2: vllm 9, transformers 3 (top-2 gap 1.000)")


def test_references_equal_the_test_suites_oracle(tiny_lite_dir, tiny_awq_dir, tmp_path) -> None:
    """The script's transformers reference (fp32; AWQ on its dequantised weights) is the suite's oracle."""
    import torch

    from tests.model_helpers import awq_reference, hf_greedy, hf_model, prompt_ids

    smoke = _module()
    ref = smoke.reference(str(tiny_lite_dir), 8, "cpu", tmp_path)
    assert ref["prompts"] == prompt_ids(tiny_lite_dir)
    assert ref["tokens"] == [
        t for t, _ in hf_greedy(hf_model(tiny_lite_dir, torch.float32), ref["prompts"], 8)
    ]
    assert all(g >= 0 for gaps in ref["gaps"] for g in gaps)

    awq = smoke.reference(str(tiny_awq_dir), 8, "cpu", tmp_path / "awq")
    prompts, want = awq_reference(tiny_awq_dir, tmp_path / "suite-dense")
    assert awq["prompts"] == prompts
    assert awq["tokens"] == [t[:8] for t, _ in want]
    json.dumps(awq)  # what `reference --out` writes


def test_lora_reference_is_transformers_on_the_merged_weights(tiny_lite_dir, tmp_path) -> None:
    """`reference --lora` = the suite's LoRA oracle (transformers on W + alpha / r B A), and differs from the
    base model's; `run` refuses a reference made with or without the adapter when it is given otherwise."""
    import argparse

    from server.tiny_model import write_tiny_lora
    from tests.model_helpers import hf_greedy, hf_load_tensors, hf_model
    from tests.test_model_lora import _merged

    smoke = _module()
    adapter = write_tiny_lora(tmp_path / "adapter", tiny_lite_dir)
    ref = smoke.reference(str(tiny_lite_dir), 8, "cpu", tmp_path, str(adapter))
    model = hf_model(tiny_lite_dir)
    hf_load_tensors(model, _merged(tiny_lite_dir, adapter))
    assert ref["tokens"] == [t for t, _ in hf_greedy(model, ref["prompts"], 8)]
    assert ref["tokens"] != smoke.reference(str(tiny_lite_dir), 8, "cpu", tmp_path)["tokens"]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(ref))
    args = argparse.Namespace(ref=str(path), lora=None, case="lora-tp1")
    assert smoke.run(args) == 1
