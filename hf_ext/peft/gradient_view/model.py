"""The gradient-view LoRA tuner (PEFT's BaseTuner), registered under peft_type ``HFX_GRADIENT_VIEW_LORA``."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner

from .layer import FACTOR_MODES, GradientViewLinear, low_rank_delta

_DELTA, _LORA_B, _LORA_A = "hfxgv_delta", "hfxgv_lora_B", "hfxgv_lora_A"


class GradientViewLoraModel(BaseTuner):
    """Wraps the target Linear layers in `GradientViewLinear` (see `GradientViewLoraConfig`).

    What the adapter file holds: in modes ``"lora"`` and ``"fixed_a"`` the rank-r factors B and A of every target
    (the size of a LoRA adapter of the same rank; ΔW = s·B A is recomputed on load, bit for bit), in mode
    ``"resample"`` the dense ΔW (its accumulated update is high-rank)."""

    prefix: str = "hfxgv_"
    tuner_layer_cls = GradientViewLinear
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        settings = dict(r=config.r, lora_alpha=config.lora_alpha, mode=config.mode, init_weights=config.init_weights)
        if isinstance(target, GradientViewLinear):
            target.update_layer(adapter_name, inference_mode=config.inference_mode, **settings)
            return
        new_module = GradientViewLinear(target, adapter_name, **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _prepare_adapter_config(peft_config, model_config):
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for module in self.model.modules():
            if isinstance(module, GradientViewLinear):
                module.freeze_factors()

    # -- the adapter file ----------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.mode in FACTOR_MODES:  # ΔW = s·B A: the factors say it all
            selected = {key: value for key, value in selected.items() if f".{_DELTA}." not in key}
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".{_LORA_B}.{adapter_name}"
        factor_keys = [key for key in remapped if key.endswith(suffix)]
        has_delta = any(f".{_DELTA}" in key for key in remapped)
        has_factors = any(f".{_LORA_B}" in key for key in remapped)  # remapped or not: resample layers have none
        if not has_factors and not has_delta:  # PEFT would load nothing and keep the fresh adapter, silently
            example = next(iter(state_dict), "(no tensors)")
            raise ValueError(
                f"this adapter file holds no gradient-view LoRA tensors (keys such as {example!r}), though its "
                f"adapter_config.json says peft_type {config.peft_type!r}: it looks like another method's adapter "
                "(a LoRA adapter holds lora_A/lora_B): load it with that method's config.")
        if config.mode not in FACTOR_MODES:
            if not has_delta:
                raise ValueError(f"this adapter file holds rank-r factors, which modes 'lora'/'fixed_a' save, but its "
                                 f"adapter_config.json says mode {config.mode!r}, which loads a dense ΔW.")
            return remapped
        if not factor_keys:
            raise ValueError(
                f"this gradient-view LoRA adapter holds a dense ΔW but no rank-{config.r} factors, which mode "
                f"{config.mode!r} saves (it was written before adapters saved their factors). Its ΔW loads as it is "
                "with \"mode\": \"resample\" in its adapter_config.json.")
        with torch.no_grad():
            for key_B in factor_keys:
                layer_key = key_B.removesuffix(suffix)
                key_A = f"{layer_key}.{_LORA_A}.{adapter_name}"
                if key_A not in remapped:
                    raise ValueError(f"the adapter file has {_LORA_B} but no {_LORA_A} for {layer_key}")
                remapped[f"{layer_key}.{_DELTA}.{adapter_name}"] = low_rank_delta(
                    remapped[key_B], remapped[key_A], config.scaling)
        return remapped


def gradient_view_optimizer(peft_model, adapter_name: str = "default", base_optimizer=torch.optim.AdamW,
                            **base_kwargs):
    """A `GradientViewLoRA` over the adapter's ΔW parameters, with the config's rank, mode, scaling and resampling;
    in modes ``"lora"``/``"fixed_a"`` it trains the factors the adapter holds (and saves).

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
    deltas = [p for name, p in peft_model.named_parameters() if f"{_DELTA}.{adapter_name}" in name]
    others = [p for name, p in peft_model.named_parameters()
              if p.requires_grad and GradientViewLoraModel.prefix not in name]  # modules_to_save: trained whole
    groups = [{"params": deltas}] + ([{"params": others}] if others else [])
    return GradientViewLoRA(groups, rank=config.r, mode=config.mode, scaling=config.scaling,
                            resample_every=config.resample_every, base_optimizer=base_optimizer, **base_kwargs)
