"""Train a Llama-family causal LM with the fused (chunked lm_head) tail-capped loss, switched on per instance.

`HfExtForCausalLM` supports the fused path natively (``model.loss_function = TailCappedLoss(..., fused=True)``).
transformers' own ``*ForCausalLM`` classes always build the full logits before calling their loss, so
`enable_fused_loss` replaces ``forward`` on the given *instance* only (never on the class): in training mode with
labels it runs the decoder, then the fused loss from the last hidden states; otherwise it calls the class's forward
unchanged. `disable_fused_loss` removes the override.
"""

from __future__ import annotations

import inspect

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.hfext import HfExtForCausalLM
from ..models.hfext.modeling_hfext import CACHE_NAME
from .tail_capped import TailCappedLoss

# Config attributes that change logits after lm_head; the fused path would silently ignore them.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def enable_fused_loss(model: torch.nn.Module, loss: TailCappedLoss) -> torch.nn.Module:
    """Make ``model`` compute ``loss`` from its last hidden states when trained with labels; returns ``model``.

    ``model`` is an `HfExtForCausalLM` or a transformers causal LM with a ``model`` decoder and a linear ``lm_head``
    (Llama, Mistral, Qwen2/3, SmolLM…). ``loss`` must be a `TailCappedLoss` with ``fused=True``.
    """
    if not isinstance(loss, TailCappedLoss) or not loss.fused:
        raise ValueError(f"enable_fused_loss: loss must be a TailCappedLoss with fused=True, got {loss!r}")
    if isinstance(model, HfExtForCausalLM):
        model.loss_function = loss
        return model
    problem = why_logits_are_not_lm_head_of_decoder(model)
    if problem is not None:
        raise ValueError(f"enable_fused_loss: {problem}")
    model.forward = _FusedLossForward(model)
    model.loss_function = loss
    return model


def why_logits_are_not_lm_head_of_decoder(model: torch.nn.Module) -> str | None:
    """None if ``model``'s logits are ``model.lm_head(model.model(...).last_hidden_state)`` and nothing more (what a
    fused loss computes from the hidden states), else the reason they may not be."""
    decoder, lm_head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(decoder, torch.nn.Module) or not isinstance(lm_head, torch.nn.Linear):
        return (f"{type(model).__name__} has no `model` decoder and linear `lm_head`; supported are HfExtForCausalLM "
                "and Llama-style *ForCausalLM models")
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return (f"{type(model).__name__} sets config.{name}={getattr(model.config, name)!r}, which the fused loss "
                    "does not apply")
    return None


class _FusedLossForward:
    """The instance-level forward `enable_fused_loss` installs. A callable object rather than a closure, so that
    ``copy.deepcopy(model)`` gives the copy a forward bound to the copy (a closure would keep running the original).
    It shows the class forward's signature, because Trainer keeps only the dataset columns forward names."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))
        self.__doc__ = f"{type(model).__name__}.forward with the fused tail-capped loss in training (hf_ext)."

    def __call__(self, *args, labels=None, logits_to_keep=0, num_items_in_batch=None, shift_labels=None, **kwargs):
        model = self.model
        if labels is None or not model.training:
            loss_kwargs = {k: v for k, v in (("num_items_in_batch", num_items_in_batch), ("shift_labels", shift_labels))
                           if v is not None}
            return type(model).forward(model, *args, labels=labels, logits_to_keep=logits_to_keep, **loss_kwargs,
                                       **kwargs)
        outputs = model.model(*args, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        value = model.loss_function.loss_from_hidden_states(hidden_states, model.lm_head, labels,
                                                            num_items_in_batch=num_items_in_batch,
                                                            shift_labels=shift_labels)
        return CausalLMOutputWithPast(loss=value, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions, **{CACHE_NAME: getattr(outputs, CACHE_NAME)})


def disable_fused_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `enable_fused_loss`: the class's forward and default loss function are used again."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_loss_function", None)
    return model
