"""Optimizers: `Lion`, with helpers for transformers' Trainer."""

from .lion import Lion
from .trainer import adamw_to_lion, lion_optimizer_cls_and_kwargs

__all__ = ["Lion", "lion_optimizer_cls_and_kwargs", "adamw_to_lion"]
