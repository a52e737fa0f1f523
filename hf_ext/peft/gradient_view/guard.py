"""Refuse to step gradient-view LoRA's ΔW with an ordinary optimizer.

ΔW is a dense trainable parameter whose gradient is the full ∂L/∂W; only `GradientViewLoRA` turns that into low-rank
updates. Any other optimizer (Trainer's default AdamW, a hand-made SGD, …) would train a full-rank ΔW without a
word, so the first `step()` of such an optimizer over a ΔW raises instead. The check is a global optimizer step
pre-hook (torch's `register_optimizer_step_pre_hook`), installed when the first ΔW is created; each optimizer is
inspected once, on its first step.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_MARK = "_hfx_gradient_view_delta"
_inspected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizers already found clean
_hook = None


def mark_gradient_view_delta(parameter: torch.nn.Parameter) -> torch.nn.Parameter:
    """Record ``parameter`` as a gradient-view ΔW and make sure ordinary optimizers are checked."""
    global _hook
    setattr(parameter, _MARK, True)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_refuse_ordinary_optimizers)
    return parameter


def _refuse_ordinary_optimizers(optimizer, args, kwargs) -> None:
    if optimizer in _inspected:
        return
    from ...optim.gradient_view import GradientViewLoRA

    if not isinstance(optimizer, GradientViewLoRA):
        for group in optimizer.param_groups:
            if any(getattr(parameter, _MARK, False) for parameter in group["params"]):
                raise RuntimeError(
                    f"{type(optimizer).__name__} is about to step the dense ΔW of a gradient-view LoRA adapter: it "
                    "would train a full-rank update. Step it with the gradient-view optimizer: "
                    "hf_ext.peft.gradient_view_optimizer(peft_model, lr=...), or with Trainer "
                    "Trainer(..., optimizers=(gradient_view_optimizer(peft_model, lr=args.learning_rate), None)).")
    _inspected[optimizer] = True
