"""dsv2-serve: DeepSeek-V2(-Lite) on vLLM behind the OpenAI API."""

__version__ = "0.1.0"
