"""Triton kernels of vllm-seer, each beside a plain-PyTorch reference with the same signature."""
