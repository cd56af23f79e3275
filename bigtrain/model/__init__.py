"""The Llama-style GPT built from megatron-core blocks (gpt.py): knows nothing of DeepSpeed, data or SLURM."""
from .gpt import build_model

__all__ = ["build_model"]
