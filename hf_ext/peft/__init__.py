"""PEFT integrations: LoRA-GA initialisation (`get_lora_ga_model`)."""

from .lora_ga import PartlyFrozenLinear, get_lora_ga_model

__all__ = ["get_lora_ga_model", "PartlyFrozenLinear"]
