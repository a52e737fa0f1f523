"""Checkpoint converters into the HfExt family."""

from .deepseek import SUPPORTED_DEEPSEEK_FAMILIES, from_deepseek
from .llama import SUPPORTED_LLAMA_FAMILIES, from_llama
from .mla import to_mla

__all__ = ["from_deepseek", "from_llama", "to_mla", "SUPPORTED_DEEPSEEK_FAMILIES", "SUPPORTED_LLAMA_FAMILIES"]
