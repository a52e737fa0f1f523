"""Optimizers: `Lion` and `GradientViewLoRA` (LoRA done in the optimizer), with helpers for transformers' Trainer."""

from .gradient_view import GradientViewLoRA
from .lion import Lion
from .trainer import adamw_to_lion, gradient_view_optimizer_cls_and_kwargs, lion_optimizer_cls_and_kwargs

__all__ = ["Lion", "GradientViewLoRA", "lion_optimizer_cls_and_kwargs", "gradient_view_optimizer_cls_and_kwargs",
           "adamw_to_lion"]
