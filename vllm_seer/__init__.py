"""vllm-seer: SeerAttention learned block-sparse prefill attention as a vLLM plugin."""

__version__ = "0.1.0"
