"""Checkpoint converters into the HfExt family."""

from .llama import SUPPORTED_LLAMA_FAMILIES, from_llama

__all__ = ["from_llama", "SUPPORTED_LLAMA_FAMILIES"]
