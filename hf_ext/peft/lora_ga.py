"""LoRA-GA for any transformers model, as a standard PEFT LoRA model that never touches the base weights.

The paper keeps the model's function unchanged at initialisation by subtracting s·B0 A0 from W0. Here the offset
lives in the adapter instead: each target gets a rank-2r PEFT LoRA adapter whose factors are

    lora_A = [A ; A0]   (trainable A, frozen A0 = initial A)      lora_B = [B | -B0]   (trainable B, frozen B0)

so its update s·(B A - B0 A0) is exactly the paper's. The frozen halves are buffers (no gradient, no optimizer state,
no weight decay) and the state dict holds the usual ``lora_A.<name>.weight`` / ``lora_B.<name>.weight``: every save
(``save_pretrained``, Trainer checkpoints) is already a standard rank-2r LoRA adapter that `PeftModel.from_pretrained`
loads onto the untouched base model — no weight conversion, no copy of the original model, quantized bases included.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F

from ..ops.lora_ga import check_lora_ga_options, lora_ga_factors
from .gradient_sketch import gradient_singular_vectors, model_loss_for, take_batches


class PartlyFrozenLinear(nn.Module):
    """A bias-free linear map with weight = cat(trainable, frozen) along ``dim`` (0: output rows, 1: input columns).

    Stored in state dicts as one ``weight``, so a PEFT adapter holding it saves and loads as plain LoRA. ``dropout``
    (the adapter's LoRA dropout) applies to the trainable rows' input only: the frozen rows stand for the base
    weight offset, which sees the undropped input, as W0 does.
    """

    def __init__(self, trainable: torch.Tensor, frozen: torch.Tensor, dim: int, dropout: nn.Module | None = None):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 or 1, got {dim}")
        self.dim = dim
        self.trainable = nn.Parameter(trainable.detach().clone())
        self.register_buffer("frozen", frozen.detach().clone())
        self.dropout = dropout if dropout is not None else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.trainable, self.frozen], dim=self.dim)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == 0:
            return torch.cat([F.linear(self.dropout(x), self.trainable), F.linear(x, self.frozen)], dim=-1)
        return F.linear(x, self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if weight.shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(weight.shape)}, "
                              f"LoRA-GA adapter {tuple(self.weight.shape)}")
            return
        trainable, frozen = weight.split([self.trainable.shape[self.dim], self.frozen.shape[self.dim]], dim=self.dim)
        with torch.no_grad():
            self.trainable.copy_(trainable)
            self.frozen.copy_(frozen)

    def extra_repr(self) -> str:
        return f"trainable={tuple(self.trainable.shape)}, frozen={tuple(self.frozen.shape)}, dim={self.dim}"


def _doubled_rank_config(config: LoraConfig) -> LoraConfig:
    """The PEFT config of the rank-2r adapter: ranks doubled, alphas changed so that every scaling s stays the same."""
    alpha_factor = math.sqrt(2.0) if config.use_rslora else 2.0  # s = α/√r or α/r
    doubled = copy.deepcopy(config)
    doubled.r = 2 * config.r
    doubled.lora_alpha = config.lora_alpha * alpha_factor
    doubled.rank_pattern = {key: 2 * value for key, value in (config.rank_pattern or {}).items()}
    doubled.alpha_pattern = {key: value * alpha_factor for key, value in (config.alpha_pattern or {}).items()}
    doubled.init_lora_weights = False  # the factors are set below
    return doubled


def _check_config(config: LoraConfig) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(config).__name__}")
    if config.use_dora:
        raise ValueError("get_lora_ga_model: use_dora=True is not supported with LoRA-GA; allowed: False")
    if config.lora_bias:
        raise ValueError("get_lora_ga_model: lora_bias=True is not supported with LoRA-GA; allowed: False")
    if config.bias != "none":
        raise ValueError(f"get_lora_ga_model: bias={config.bias!r} is not supported with LoRA-GA; allowed: 'none'")
    if config.init_lora_weights is not True:
        raise ValueError(f"get_lora_ga_model: init_lora_weights={config.init_lora_weights!r} conflicts with LoRA-GA, "
                         "which sets the weights itself; leave it at its default True")


@contextmanager
def _estimation_mode(model: nn.Module):
    """Eval mode (no dropout: every gradient pass must see the same function), except for bitsandbytes 4-bit layers.

    On CPU, a 4-bit layer called in eval mode with an input that needs no gradient repacks its weight for an
    inference kernel that has no backward (bitsandbytes 0.50); afterwards gradients through it are silently lost.
    Gradients must pass through every 4-bit layer, targets or not: they all stay in training mode here (they have
    no dropout), and weights already repacked by an earlier inference call are unpacked first.
    """
    was_training = model.training
    model.eval()
    four_bit = [layer for layer in model.modules() if hasattr(getattr(layer, "weight", None), "quant_state")]
    for layer in four_bit:
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse  # what bnb's own save uses

            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state)
        layer.train()
    try:
        yield
    finally:
        model.train(was_training)


def _trainable_rank(layer: LoraLayer, adapter_name: str) -> int:
    """r of the user's config: the adapter holds 2r rows, half of them the frozen offset."""
    return layer.r[adapter_name] // 2


def _check_targets(lora_layers: dict, adapter_name: str) -> None:
    if not lora_layers:
        raise ValueError("target_modules matched no layer of the model")
    for name, layer in lora_layers.items():
        if adapter_name not in layer.lora_A or not isinstance(layer.lora_A[adapter_name], nn.Linear):
            raise ValueError(f"LoRA-GA supports linear target layers only; {name} wraps "
                             f"{type(layer.get_base_layer()).__name__}: remove it from target_modules")
        rank = _trainable_rank(layer, adapter_name)
        if 2 * rank > min(layer.in_features, layer.out_features):
            raise ValueError(f"r={rank} is too large for {name} ({layer.out_features}×{layer.in_features}): LoRA-GA "
                             f"needs 2·r <= min(out_features, in_features)")


# Sketch widths in multiples of the LoRA rank r. The range finder refines its q = 4r columns with power iterations;
# the single pass cannot, so it oversamples more: at 32r its subspaces match one power iteration's (see the docstring).
RANGE_FINDER_WIDTH = 4
SINGLE_PASS_WIDTH = 32


def get_lora_ga_model(
    model: nn.Module,
    lora_config: LoraConfig,
    dataloader: Iterable,
    *,
    num_gradient_batches: int = 8,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    power_iterations: int | None = None,
    seed: int = 0,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    show_progress: bool = True,
    recompute_blocks: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model initialised by LoRA-GA (arXiv 2407.05000), base weights untouched.

    The mean gradient of the model's own loss (or ``loss_fn(model, batch)``) over the first ``num_gradient_batches``
    batches of ``dataloader`` is reduced, target by target, to its top singular vectors, computed from each layer's
    inputs and output gradients so that no weight gradient is ever formed — quantized (bitsandbytes 4/8-bit) bases
    work. ``power_iterations=None`` (default): one pass over the batches builds a two-sided randomized sketch of each
    gradient (Tropp et al. 2017) of width k = min(32r, out, in), about k·max(out, in) + 2k·min(out, in) numbers per
    layer, or accumulates the gradient itself where that is no bigger (then svd_lowrank with 4r columns, as PEFT
    does). An int: `torch.svd_lowrank`'s range finder (q = min(4r, out, in), ``power_iterations`` like its ``niter``)
    in 2 + 2·niter passes, a few [dim, 4r] matrices per layer: less memory, more time; PEFT's built-in runs 4 on its
    resident gradient. Against the exact SVD of SmolLM2-135M's gradients both the default and one power iteration
    recover the top-r right singular subspace to an overlap of at least 0.97 and the left one of ranks r+1..2r to
    at least 0.8 (tests/test_lora_ga_accuracy.py). Each decoder layer is re-run during backward instead of keeping
    its activations (``recompute_blocks``), and a Llama-style causal LM's loss is computed from the last hidden
    states in chunks, never as full logits (`gradient_sketch.chunked_causal_lm_loss`, the same cross-entropy): the
    peak memory is about one decoder layer's activations (plus, by default, the sketches). Under torch.distributed
    every rank passes its own batches; the products are averaged across ranks.

    The factors follow the paper's reference code: A from the top-r right singular vectors, B from the left ones
    r+1..2r (``direction="ArB2r"``), both scaled by out_features^¼/√``stable_gamma`` (``scale="stable"``). The
    model's output is unchanged at initialisation (tested) and the returned model saves as a standard rank-2r LoRA
    adapter (see the module docstring). ``lora_config`` supplies r, lora_alpha, use_rslora (recommended by the
    paper), target_modules, lora_dropout, rank_pattern/alpha_pattern and task_type; DoRA and LoRA biases are refused.
    ``adapter_name``, ``autocast_adapter_dtype`` and ``revision`` mean what they mean in PEFT's `get_peft_model`: with
    ``autocast_adapter_dtype=False`` the factors of a float16/bfloat16 base stay in its dtype (PEFT's default, True,
    keeps them in float32).

    Example::

        from peft import LoraConfig
        from hf_ext.peft import get_lora_ga_model
        config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_lora_ga_model(model, config, DataLoader(train_dataset, batch_size=8, collate_fn=collator))
        Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator).train()
        model.save_pretrained("adapter")   # loads on the original base: PeftModel.from_pretrained(base, "adapter")
    """
    if isinstance(model, PeftModel):
        raise TypeError("get_lora_ga_model expects the base model, not a PeftModel: pass model.get_base_model() or "
                        "the model before get_peft_model")
    _check_config(lora_config)
    check_lora_ga_options(direction, scale, stable_gamma)  # before the gradient passes, not after
    if not isinstance(num_gradient_batches, int) or num_gradient_batches < 1:
        raise ValueError(f"num_gradient_batches must be a positive int, got {num_gradient_batches!r}")
    if power_iterations is not None and (not isinstance(power_iterations, int) or isinstance(power_iterations, bool)
                                         or power_iterations < 0):
        raise ValueError(f"power_iterations must be None (one pass, the default) or an int >= 0, got "
                         f"{power_iterations!r}")
    batches = take_batches(dataloader, num_gradient_batches)

    peft_model = get_peft_model(model, _doubled_rank_config(lora_config), adapter_name=adapter_name,
                                autocast_adapter_dtype=autocast_adapter_dtype, revision=revision)
    lora_layers = {name: module for name, module in peft_model.named_modules()
                   if isinstance(module, LoraLayer) and adapter_name in module.r}
    try:
        _check_targets(lora_layers, adapter_name)
        base_layers = {name: layer.get_base_layer() for name, layer in lora_layers.items()}
        ranks = {name: _trainable_rank(layer, adapter_name) for name, layer in lora_layers.items()}
        width = SINGLE_PASS_WIDTH if power_iterations is None else RANGE_FINDER_WIDTH
        q = {name: min(width * ranks[name], layer.in_features, layer.out_features)
             for name, layer in lora_layers.items()}
        with peft_model.disable_adapter(), _estimation_mode(peft_model):
            vectors = gradient_singular_vectors(peft_model, base_layers, batches, loss_fn or model_loss_for(model),
                                                q=q, keep={name: 2 * rank for name, rank in ranks.items()},
                                                power_iterations=power_iterations, seed=seed,
                                                show_progress=show_progress, recompute_blocks=recompute_blocks)
    except BaseException:
        peft_model.unload()  # give the caller's model back as it was: no LoRA layers left behind
        raise

    for name, layer in lora_layers.items():
        left, _, right = vectors[name]
        lora_a, lora_b = lora_ga_factors(left, right, _trainable_rank(layer, adapter_name),
                                         scaling=layer.scaling[adapter_name], direction=direction, scale=scale,
                                         stable_gamma=stable_gamma)
        reference = layer.lora_A[adapter_name].weight
        lora_a, lora_b = (t.to(device=reference.device, dtype=reference.dtype) for t in (lora_a, lora_b))
        layer.lora_A[adapter_name] = PartlyFrozenLinear(lora_a, lora_a, dim=0, dropout=layer.lora_dropout[adapter_name])
        layer.lora_B[adapter_name] = PartlyFrozenLinear(lora_b, -lora_b, dim=1)
        layer.lora_dropout[adapter_name] = nn.Identity()  # moved into lora_A: it must not reach the frozen rows
    peft_model.peft_config[adapter_name].init_lora_weights = True  # the saved adapter is plain LoRA
    return peft_model
