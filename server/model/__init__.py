"""The dsv2-serve vLLM plugin: our DeepSeek-V2 model class, registered under vLLM's own architecture name.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts: the API
server, the engine core and each worker. It must stay cheap and idempotent, and must not import torch
layers or initialise CUDA, so the model class is registered lazily as "module:Class".
"""

from __future__ import annotations

from server.model.config import ARCHITECTURE, DeepseekV2ConfigCheck

MODEL_CLASS = "server.model.deepseek_v2:DeepseekV2ForCausalLM"


def register() -> None:
    """Make vLLM build DeepSeek-V2(-Lite) checkpoints with our class, overriding its built-in one."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from server.gateway.startup import install_phase_reporter

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # The server watches start-up phases through vLLM's log lines in these processes.
    install_phase_reporter()
    # Config and tensor-parallel checks when vLLM builds its config, before any worker starts.
    MODELS_CONFIG_MAP[ARCHITECTURE] = DeepseekV2ConfigCheck
