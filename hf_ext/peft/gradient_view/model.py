"""The gradient-view LoRA tuner (PEFT's BaseTuner), registered under peft_type ``HFX_GRADIENT_VIEW_LORA``."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner

from .layer import GradientViewLinear


class GradientViewLoraModel(BaseTuner):
    """Wraps the target Linear layers in `GradientViewLinear` (see `GradientViewLoraConfig`)."""

    prefix: str = "hfxgv_"
    tuner_layer_cls = GradientViewLinear
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, GradientViewLinear):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, init_weights=config.init_weights)
            return
        new_module = GradientViewLinear(target, adapter_name, init_weights=config.init_weights)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _prepare_adapter_config(peft_config, model_config):
        return peft_config


def gradient_view_optimizer(peft_model, adapter_name: str = "default", base_optimizer=torch.optim.AdamW,
                            **base_kwargs):
    """A `GradientViewLoRA` over the adapter's ΔW parameters, with the config's rank, mode, scaling and resampling.

    Example::

        model = get_peft_model(model, GradientViewLoraConfig(r=8, mode="resample", target_modules="all-linear"))
        optimizer = gradient_view_optimizer(model, lr=1e-3)
        # or: Trainer(..., optimizers=(gradient_view_optimizer(model, lr=args.learning_rate), None))
    """
    from ...optim.gradient_view import GradientViewLoRA
    from .config import GradientViewLoraConfig

    config = peft_model.peft_config.get(adapter_name)
    if not isinstance(config, GradientViewLoraConfig):
        raise ValueError(f"adapter {adapter_name!r} is not a gradient-view LoRA adapter (got {type(config).__name__})")
    deltas = [p for name, p in peft_model.named_parameters() if f"hfxgv_delta.{adapter_name}" in name]
    others = [p for name, p in peft_model.named_parameters()
              if p.requires_grad and "hfxgv_delta." not in name]  # modules_to_save: trained whole
    groups = [{"params": deltas}] + ([{"params": others}] if others else [])
    return GradientViewLoRA(groups, rank=config.r, mode=config.mode, scaling=config.scaling,
                            resample_every=config.resample_every, base_optimizer=base_optimizer, **base_kwargs)
