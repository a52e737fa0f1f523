"""Refuse to step gradient-view LoRA's ΔW with an ordinary optimizer.

ΔW is a dense trainable parameter whose gradient is the full ∂L/∂W; only `GradientViewLoRA` turns that into low-rank
updates. Any other optimizer (Trainer's default AdamW, a hand-made SGD, …) would train a full-rank ΔW without a
word, so the first `step()` of such an optimizer over a ΔW raises instead. The check is a global optimizer step
pre-hook (torch's `register_optimizer_step_pre_hook`), installed when the first gradient-view layer is created; each
optimizer is inspected once, on its first step, against the ΔW parameters the live layers hold at that moment (PEFT
may rebuild a layer's parameters, e.g. with ``low_cpu_mem_usage``, so nothing is attached to the tensors).
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_layers: weakref.WeakSet = weakref.WeakSet()  # every GradientViewLinear alive
_inspected: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizers already found clean
_hook = None


def watch_gradient_view_layer(layer: nn.Module) -> None:
    """Have ordinary optimizers checked against ``layer``'s ΔW parameters (its ``hfxgv_delta``)."""
    global _hook
    _layers.add(layer)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_refuse_ordinary_optimizers)


def _refuse_ordinary_optimizers(optimizer, args, kwargs) -> None:
    if optimizer in _inspected:
        return
    from ...optim.gradient_view import GradientViewLoRA

    if not isinstance(optimizer, GradientViewLoRA):
        deltas = {id(delta) for layer in list(_layers) for delta in layer.hfxgv_delta.values()}
        if any(id(parameter) in deltas for group in optimizer.param_groups for parameter in group["params"]):
            raise RuntimeError(
                f"{type(optimizer).__name__} is about to step the dense ΔW of a gradient-view LoRA adapter: it "
                "would train a full-rank update. Step it with the gradient-view optimizer: "
                "hf_ext.peft.gradient_view_optimizer(peft_model, lr=...), or with Trainer "
                "Trainer(..., optimizers=(gradient_view_optimizer(peft_model, lr=args.learning_rate), None)).")
    _inspected[optimizer] = True
