"""The fine-tuning methods `lora_finetuning` compares at the same rank: each one's PEFT model and optimizer.

``lora`` and ``pissa`` are PEFT's `LoraConfig` (default init / ``init_lora_weights=pissa_init``); ``peft_lora_ga`` is
PEFT's built-in LoRA-GA (``preprocess_loraga`` over the gradient batches, then ``get_peft_model``);
``hf_ext_lora_ga`` is `hf_ext.peft.get_lora_ga_model` with the same batches and options; ``gv_*`` are hf_ext's
gradient-view LoRA modes (`hf_ext.peft.GradientViewLoraConfig`, trained by `hf_ext.peft.gradient_view_optimizer`).
Every method gets AdamW with the same learning rate and weight decay.
"""

from __future__ import annotations

import warnings

import torch

METHODS = {
    "lora": "LoRA (PEFT, default init)",
    "pissa": "PiSSA (PEFT, pissa_niter_4)",
    "peft_lora_ga": "LoRA-GA (PEFT built-in)",
    "hf_ext_lora_ga": "LoRA-GA (hf_ext get_lora_ga_model)",
    "gv_lora": "gradient-view LoRA, mode lora",
    "gv_fixed_a": "gradient-view LoRA, mode fixed_a",
    "gv_resample": "gradient-view LoRA, mode resample",
}
GV_MODES = {"gv_lora": "lora", "gv_fixed_a": "fixed_a", "gv_resample": "resample"}


def lora_config(settings: dict, **extra):
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["lora_alpha"],
                      target_modules=list(settings["target_modules"]), task_type="CAUSAL_LM", **extra)


def initialise(method: str, model, gradient_batches: list[dict], settings: dict):
    """The PEFT model of ``method`` around ``model`` (changed or wrapped in place: pass a fresh copy)."""
    torch.manual_seed(settings["seed"])  # PEFT's default A init, PiSSA's and PEFT LoRA-GA's svd_lowrank draw from it
    with warnings.catch_warnings():
        # get_peft_model calls transformers' deprecated is_gradient_checkpointing (transformers 5.x, PEFT 0.21).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return _initialise(method, model, gradient_batches, settings)


def _initialise(method: str, model, gradient_batches: list[dict], settings: dict):
    from peft import get_peft_model

    if method == "lora":
        return get_peft_model(model, lora_config(settings))
    if method == "pissa":
        return get_peft_model(model, lora_config(settings, init_lora_weights=settings["pissa_init"]))
    if method == "peft_lora_ga":
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        config = lora_config(settings, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(
            direction=settings["direction"], scale=settings["scale"], stable_gamma=settings["stable_gamma"]))

        def train_step():
            for batch in gradient_batches:
                model(**batch).loss.backward()

        with warnings.catch_warnings():
            # PEFT counts gradient passes with full backward hooks on layers whose inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(model, config, train_step=train_step)
        return get_peft_model(model, config)
    if method == "hf_ext_lora_ga":
        from hf_ext.peft import get_lora_ga_model

        return get_lora_ga_model(model, lora_config(settings), gradient_batches,
                                 num_gradient_batches=len(gradient_batches), direction=settings["direction"],
                                 scale=settings["scale"], stable_gamma=settings["stable_gamma"],
                                 power_iterations=settings["power_iterations"], seed=settings["seed"],
                                 show_progress=False)
    if method in GV_MODES:
        from hf_ext.peft import GradientViewLoraConfig

        return get_peft_model(model, GradientViewLoraConfig(
            r=settings["rank"], lora_alpha=settings["lora_alpha"], mode=GV_MODES[method],
            resample_every=settings["resample_every"], target_modules=list(settings["target_modules"])))
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")


def make_optimizer(method: str, peft_model, settings: dict) -> torch.optim.Optimizer:
    """AdamW with the same learning rate for every method (gradient view: AdamW on its rank-r factors)."""
    if method in GV_MODES:
        from hf_ext.peft import gradient_view_optimizer

        return gradient_view_optimizer(peft_model, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])


def trained_parameter_count(method: str, peft_model, optimizer) -> int:
    """Entries the optimizer actually trains (gradient view: the factors, not the dense ΔW)."""
    if method in GV_MODES:
        return sum(p.numel() for group in optimizer.base.param_groups for p in group["params"])
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
