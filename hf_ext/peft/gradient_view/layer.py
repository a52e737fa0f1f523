"""The gradient-view LoRA layer: a Linear (or transformers' Conv1D) plus a dense trainable update ΔW."""

from __future__ import annotations

import math
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ...optim.model_held_factors import HeldFactors, track_layer

FACTOR_MODES = ("lora", "fixed_a")  # the modes whose ΔW is exactly s·B A, so the adapter saves B and A


def low_rank_delta(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·B A, computed the way `GradientViewLoRA` computes it, so a reloaded ΔW is bit-identical."""
    return scaling * (lora_B @ lora_A)


class GradientViewLinear(nn.Module, BaseTunerLayer):
    """y = base(x) + x ΔWᵀ. ΔW is trained by `GradientViewLoRA` through rank-r factors, so every change it receives
    is low-rank per step; its gradient is the full ∂L/∂W the optimizer projects.

    In modes ``"lora"`` and ``"fixed_a"`` the layer also holds the factors, B [m, r] and A [r, n] (frozen tensors
    the optimizer steps itself), and ΔW = s·B A at all times: the adapter saves B and A, like a LoRA adapter, and ΔW
    is recomputed on load. In mode ``"resample"`` the accumulated ΔW is high-rank and is saved dense.

    ΔW has the base weight's own layout: [out, in] for `torch.nn.Linear`, [in, out] for transformers' `Conv1D`
    (GPT-2's fused projections, PEFT's ``fan_in_fan_out``), so merging is W + ΔW for both."""

    adapter_layer_names = ("hfxgv_delta",)
    other_param_names = ("hfxgv_lora_B", "hfxgv_lora_A", "r", "scaling", "mode")

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 8,
                 mode: str = "lora", init_weights: bool = True, **kwargs) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Linear):
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif isinstance(base_layer, Conv1D):
            self.fan_in_fan_out = True
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            # PEFT's own wording ("Target module ... is not supported"), which its users and tests match
            raise TypeError(f"Target module {type(base_layer).__name__} is not supported: gradient-view LoRA adapts "
                            "torch.nn.Linear and transformers' Conv1D layers")
        self.base_layer = base_layer
        self.hfxgv_delta = nn.ParameterDict({})
        self.hfxgv_lora_B = nn.ParameterDict({})
        self.hfxgv_lora_A = nn.ParameterDict({})
        self.r, self.scaling, self.mode = {}, {}, {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r=r, lora_alpha=lora_alpha, mode=mode, init_weights=init_weights)
        track_layer(self)

    def update_layer(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, mode: str = "lora",
                     inference_mode: bool = False, init_weights: bool = True, **kwargs) -> None:
        weight = self.get_base_layer().weight
        like = dict(dtype=weight.dtype, device=weight.device)
        self.r[adapter_name], self.scaling[adapter_name], self.mode[adapter_name] = r, lora_alpha / r, mode
        if mode in FACTOR_MODES:
            m, n = weight.shape
            # PEFT LoRA's init: A kaiming-uniform(a=√5) of a Linear(n → r), i.e. U(-1/√n, 1/√n); B zero, or, for
            # init_weights=False (PEFT's convention for tests), N(0, 0.02²) so that ΔW is small but not zero
            lora_A = torch.empty(r, n, **like).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))
            lora_B = torch.zeros(m, r, **like)
            if not init_weights:
                nn.init.normal_(lora_B, std=0.02)
            self.hfxgv_lora_B[adapter_name] = nn.Parameter(lora_B, requires_grad=False)
            self.hfxgv_lora_A[adapter_name] = nn.Parameter(lora_A, requires_grad=False)
            delta = low_rank_delta(lora_B, lora_A, self.scaling[adapter_name])
        else:
            delta = torch.zeros_like(weight)
            if not init_weights:  # PEFT's convention for tests: an adapter that changes the output from the start
                nn.init.normal_(delta, std=0.02)
        self.hfxgv_delta[adapter_name] = nn.Parameter(delta)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def freeze_factors(self) -> None:
        """Keep B and A out of autograd and out of "trainable parameters": only the optimizer changes them. PEFT's
        dtype and device moves rebuild them as new, gradient-requiring Parameters, so this runs after each."""
        for factor in (*self.hfxgv_lora_B.values(), *self.hfxgv_lora_A.values()):
            factor.requires_grad_(False)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        self.freeze_factors()

    # -- what the optimizer and its guard read (hf_ext.optim.model_held_factors) ---------------------------------

    def delta_parameters(self) -> list[torch.Tensor]:
        return list(self.hfxgv_delta.values())

    def held_factors(self, param: torch.Tensor) -> Optional[HeldFactors]:
        for name, delta in self.hfxgv_delta.items():
            if delta is param and name in self.hfxgv_lora_B:
                return HeldFactors(self.hfxgv_lora_B[name], self.hfxgv_lora_A[name], rank=self.r[name],
                                   mode=self.mode[name], scaling=self.scaling[name],
                                   owner=f"adapter {name!r} of a {self.out_features}×{self.in_features} layer")
        return None

    # -- merging and the forward pass ----------------------------------------------------------------------------

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
