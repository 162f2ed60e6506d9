"""Shared fixtures: tiny DeepSeek-V2 checkpoints generated once per test session.

Engines in tests run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 starts in seconds instead of ~30 s) with a
small CPU KV cache; both can be overridden from the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# AMX_MLA (chosen by vLLM on CPUs with AMX) only takes bf16/fp16 weights; fp32 comparisons use the
# reference CPU_MLA backend, which every x86 CPU has. GPU backends are untouched by this.
FP32_ATTENTION_BACKEND = "CPU_MLA"


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    from server.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_lite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V2-Lite layout, bf16 tensors, seed 0."""
    return _make(tmp_path_factory, "tiny-lite")


@pytest.fixture(scope="session")
def tiny_v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full DeepSeek-V2 layout (q compression, group-limited routing), bf16 tensors, seed 0."""
    return _make(tmp_path_factory, "tiny-v2", variant="v2")


@pytest.fixture(scope="session")
def tiny_awq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V2-Lite layout in AutoAWQ GEMM 4-bit (group 64), seed 0."""
    return _make(tmp_path_factory, "tiny-awq", awq=True)
