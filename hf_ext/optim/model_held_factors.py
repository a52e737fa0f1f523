"""The model layers whose dense update ΔW only `GradientViewLoRA` may step (gradient-view LoRA's PEFT layers).

Such a layer holds a trainable ΔW, whose gradient is the full ∂L/∂W the optimizer projects, and, in modes ``"lora"``
and ``"fixed_a"``, the rank-r factors with ΔW = s·B A: the adapter saves the factors, so the optimizer must train
those very tensors (`held_factors`) rather than factors of its own.

Any other optimizer (Trainer's default AdamW, a hand-made SGD, …) would train a full-rank ΔW without a word, so the
first `step()` of such an optimizer over a ΔW raises instead. The check is a global optimizer step pre-hook (torch's
`register_optimizer_step_pre_hook`), installed when the first layer is tracked; each optimizer is inspected once, on
its first step, against the ΔW parameters the live layers hold at that moment (PEFT may rebuild a layer's
parameters, e.g. with ``low_cpu_mem_usage``, so nothing is attached to the tensors).

A tracked layer provides ``delta_parameters()`` (its ΔW tensors) and ``held_factors(param)`` (a `HeldFactors` for
one of its ΔW, or None where it holds no factors). Only torch is imported here, so the optimizer needs no PEFT.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_layers: weakref.WeakSet = weakref.WeakSet()  # every tracked layer alive
_inspected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizers already found clean
_hook = None


@dataclass(frozen=True)
class HeldFactors:
    """The factors a layer holds for one ΔW (ΔW = scaling · lora_B @ lora_A) and the settings they were made with."""

    lora_B: torch.Tensor
    lora_A: torch.Tensor
    rank: int
    mode: str
    scaling: float
    owner: str  # names the layer and adapter in error messages


def track_layer(layer: nn.Module) -> None:
    """Have ordinary optimizers refused on ``layer``'s ΔW, and its factors found by `GradientViewLoRA`."""
    global _hook
    _layers.add(layer)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_refuse_ordinary_optimizers)


def held_factors(param: torch.Tensor) -> Optional[HeldFactors]:
    """The factors a live layer holds for ``param`` (one of its ΔW), or None."""
    for layer in list(_layers):
        found = layer.held_factors(param)
        if found is not None:
            return found
    return None


def _refuse_ordinary_optimizers(optimizer, args, kwargs) -> None:
    if optimizer in _inspected:
        return
    from .gradient_view import GradientViewLoRA

    if not isinstance(optimizer, GradientViewLoRA):
        deltas = {id(delta) for layer in list(_layers) for delta in layer.delta_parameters()}
        if any(id(parameter) in deltas for group in optimizer.param_groups for parameter in group["params"]):
            raise RuntimeError(
                f"{type(optimizer).__name__} is about to step the dense ΔW of a gradient-view LoRA adapter: it "
                "would train a full-rank update. Step it with the gradient-view optimizer: "
                "hf_ext.peft.gradient_view_optimizer(peft_model, lr=...), or with Trainer "
                "Trainer(..., optimizers=(gradient_view_optimizer(peft_model, lr=args.learning_rate), None)).")
    _inspected[optimizer] = True
