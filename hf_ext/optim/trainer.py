"""Glue between `Lion` and transformers' Trainer (which has no optimizer-name registry for third-party classes)."""

from __future__ import annotations

import torch

from .._validation import check_number
from .lion import Lion


def lion_optimizer_cls_and_kwargs(
    args,
    *,
    betas: tuple[float, float] = (0.9, 0.99),
    foreach: bool | None = None,
    fused: bool | None = None,
    state_dtype: torch.dtype | None = None,
    nonfinite_grads: str = "raise",
) -> tuple[type[Lion], dict]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)`` that trains with `Lion`::

        trainer = Trainer(model, args, train_dataset=ds,
                          optimizer_cls_and_kwargs=hf_ext.optim.lion_optimizer_cls_and_kwargs(args))

    The learning rate is ``args.learning_rate`` (scheduled by the Trainer as usual). Weight decay is deliberately not
    in the kwargs: the Trainer builds two parameter groups, ``args.weight_decay`` for weight matrices and 0 for
    biases and norm weights, and would override a kwarg anyway — set ``TrainingArguments.weight_decay``. ``betas``
    default to the paper's (0.9, 0.99), not to ``args.adam_beta1/2`` (Adam's 0.999 is wrong for Lion).
    ``nonfinite_grads`` is `Lion`'s (``"raise"`` or ``"skip"`` a step whose gradients hold NaN or inf). Every value,
    ``args.weight_decay`` included, is checked now, not when the Trainer first builds the optimizer.
    """
    learning_rate = getattr(args, "learning_rate", None)
    if learning_rate is None:
        raise TypeError(f"lion_optimizer_cls_and_kwargs: args must be TrainingArguments, got {type(args).__name__}")
    check_number("weight_decay (TrainingArguments)", getattr(args, "weight_decay", 0.0), low=0)
    kwargs = dict(lr=learning_rate, betas=tuple(betas), foreach=foreach, fused=fused, state_dtype=state_dtype,
                  nonfinite_grads=nonfinite_grads)
    Lion([torch.zeros(1, requires_grad=True)], **kwargs)  # validate now, not when the Trainer first builds it
    return Lion, kwargs


def adamw_to_lion(learning_rate: float, weight_decay: float, factor: float = 3.0) -> dict[str, float]:
    """Lion hyper-parameters for someone switching from AdamW: learning rate ÷ factor, weight decay × factor.

    The Lion paper recommends a factor of 3–10 (the effective decay η·λ stays the same); lion-pytorch's LM runs found
    3 better than 10. The keys are ``TrainingArguments`` field names::

        args = TrainingArguments(output_dir, **adamw_to_lion(3e-4, 0.01))      # lr 1e-4, weight_decay 0.03
    """
    check_number("learning_rate", learning_rate, low=0)
    check_number("weight_decay", weight_decay, low=0)
    check_number("factor", factor, low=1, high=30, why="the Lion paper uses 3-10")
    return {"learning_rate": learning_rate / factor, "weight_decay": weight_decay * factor}


def gradient_view_optimizer_cls_and_kwargs(
    args,
    *,
    rank: int,
    mode: str = "lora",
    scaling: float = 1.0,
    resample_every: int = 200,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **base_kwargs,
) -> tuple[type, dict]:
    """The value for ``Trainer(optimizer_cls_and_kwargs=...)`` that trains with `GradientViewLoRA`::

        Trainer(model, args, train_dataset=ds,
                optimizer_cls_and_kwargs=gradient_view_optimizer_cls_and_kwargs(args, rank=8, mode="resample"))

    The base optimizer gets ``args.learning_rate`` (scheduled by the Trainer) and, for the default AdamW,
    ``args.adam_beta1/2`` and ``args.adam_epsilon``; weight decay comes from the Trainer's two parameter groups
    (``args.weight_decay`` for matrices, 0 for biases and norms). ``base_kwargs`` add or override options
    (``nonfinite_grads`` goes to `GradientViewLoRA`); all are checked now, unknown keywords included.
    """
    from .gradient_view import GradientViewLoRA

    learning_rate = getattr(args, "learning_rate", None)
    if learning_rate is None:
        raise TypeError(f"gradient_view_optimizer_cls_and_kwargs: args must be TrainingArguments, "
                        f"got {type(args).__name__}")
    kwargs = dict(rank=rank, mode=mode, scaling=scaling, resample_every=resample_every,
                  base_optimizer=base_optimizer, lr=learning_rate)
    if base_optimizer is torch.optim.AdamW:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    kwargs.update(base_kwargs)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    GradientViewLoRA([torch.zeros(1, 1, requires_grad=True)], **{**kwargs, "rank": 1})  # validate the rest now
    return GradientViewLoRA, kwargs
