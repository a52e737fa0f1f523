"""Gradient-view LoRA as a PEFT method: `get_peft_model(model, GradientViewLoraConfig(...))`, trained by
`gradient_view_optimizer(peft_model)`; saves and loads like any PEFT adapter after ``import hf_ext``."""

from .config import PEFT_TYPE, GradientViewLoraConfig
from .layer import GradientViewLinear
from .model import GradientViewLoraModel, gradient_view_optimizer

__all__ = ["GradientViewLoraConfig", "GradientViewLinear", "GradientViewLoraModel", "gradient_view_optimizer",
           "PEFT_TYPE"]
