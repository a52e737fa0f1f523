"""The gradient-view LoRA layer: a Linear (or transformers' Conv1D) plus a dense trainable update ΔW, zero at first."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .guard import watch_gradient_view_layer


class GradientViewLinear(nn.Module, BaseTunerLayer):
    """y = base(x) + x ΔWᵀ. ΔW is trained by `GradientViewLoRA` through low-rank factors, so every change it
    receives is low-rank per step; its gradient is the full ∂L/∂W the optimizer projects.

    ΔW has the base weight's own layout: [out, in] for `torch.nn.Linear`, [in, out] for transformers' `Conv1D`
    (GPT-2's fused projections, PEFT's ``fan_in_fan_out``), so merging is W + ΔW for both."""

    adapter_layer_names = ("hfxgv_delta",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, init_weights: bool = True, **kwargs) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            raise TypeError(f"gradient-view LoRA adapts torch.nn.Linear and transformers' Conv1D layers, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.hfxgv_delta = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, init_weights=init_weights)
        watch_gradient_view_layer(self)

    def update_layer(self, adapter_name: str, inference_mode: bool = False, init_weights: bool = True,
                     **kwargs) -> None:
        weight = self.get_base_layer().weight
        delta = torch.zeros_like(weight)
        if not init_weights:  # PEFT's convention for tests: an adapter that changes the output from the start
            nn.init.normal_(delta, std=0.02)
        self.hfxgv_delta[adapter_name] = nn.Parameter(delta)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.hfxgv_delta[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.hfxgv_delta:
                weight = self.get_base_layer().weight
                # ΔW may be float32 over a half-precision base (PEFT's autocast_adapter_dtype); the base keeps its dtype
                merged = weight.data + self.get_delta_weight(name).detach().to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights of adapter {name}")
                self.get_base_layer().weight.data = merged
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data -= self.get_delta_weight(name).detach().to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.hfxgv_delta:
                delta = self.hfxgv_delta[name]
                delta = delta.t() if self.fan_in_fan_out else delta  # F.linear computes x·Wᵀ
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "hfx_gradient_view." + super().__repr__()
