"""Conversion to and from Hugging Face Llama (hf.py)."""
from .hf import from_hf, to_hf

__all__ = ["to_hf", "from_hf"]
