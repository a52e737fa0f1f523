"""PEFT integrations: LoRA-GA initialisation (`get_lora_ga_model`) and gradient-view LoRA as a PEFT method."""

from .gradient_view import GradientViewLoraConfig, gradient_view_optimizer
from .lora_ga import PartlyFrozenLinear, get_lora_ga_model

__all__ = ["get_lora_ga_model", "PartlyFrozenLinear", "GradientViewLoraConfig", "gradient_view_optimizer"]
