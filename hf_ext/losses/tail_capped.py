"""`TailCappedLoss`: TaiLr's tail-capped cross-entropy for causal LMs, in the shapes the Trainer expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_choice, check_integer, check_number
from ..ops.tail_capped import fused_linear_tail_capped_loss, tail_capped_token_losses


class TailCappedLoss:
    """Tail-capped (TaiLr) cross-entropy: each target token's NLL weighted by w = clamp(p/(γ+(1−γ)p), min_weight, 1).

    One object serves the three places transformers takes a causal-LM loss; all return the sum over valid target
    tokens divided by ``num_items_in_batch`` when the Trainer passes it (so gradient accumulation and DDP are exact)
    and by the number of valid targets otherwise — the convention of transformers' ``ForCausalLMLoss``::

        Trainer(model, args, compute_loss_func=TailCappedLoss(gamma=0.1))    # (outputs, labels, num_items_in_batch)
        model.loss_function = TailCappedLoss(gamma=0.1)                      # (logits, labels, vocab_size, ...)
        model.loss_function = TailCappedLoss(gamma=0.1, fused=True)          # HfExt: chunked lm_head, no full logits

    With ``fused=True`` an `HfExtForCausalLM` in training mode computes the loss from its last hidden states through
    `loss_from_hidden_states` and returns ``logits=None``; for Llama-family models use
    `hf_ext.losses.enable_fused_loss`. In eval mode the ordinary path runs and logits are returned. As
    ``compute_loss_func`` (which receives full logits) only ``fused=False`` is accepted. TRL's `SFTTrainer` computes
    its own loss and never calls ``model.loss_function``: use `hf_ext.trl.TailCappedSFTTrainer` there.

    Args:
        gamma: γ in [0, 1). 0 is exactly cross-entropy; the TaiLr scripts use 0.1 (translation) to 0.8
            (summarisation fine-tuning) and 1e-7 with ``min_weight=0.2`` from scratch. From scratch keep γ tiny:
            every weight starts near p/γ ≈ 0, and γ = 0.1 without a floor ends worse than the untrained model
            (``python -m benchmarks.training_quality`` in a checkout).
        min_weight: floor b of the weight, in [0, 1] (the paper's "density min weight"; 0.2–0.3 in its scripts).
        ignore_index: label value that is not a target (-100, as in transformers).
        label_smoothing: ε in [0, 1); the smoothing term is not re-weighted.
        fused: compute the loss chunk by chunk from hidden states when the model supports it.
        chunk_size: tokens per chunk of the fused path ([chunk_size, vocab] fp32 block alive at a time).
    """

    def __init__(self, gamma: float, min_weight: float = 0.0, ignore_index: int = -100, label_smoothing: float = 0.0,
                 fused: bool = False, chunk_size: int = 1024):
        check_number("TailCappedLoss: gamma", gamma, low=0.0, high=1.0, high_open=True)
        check_number("TailCappedLoss: min_weight", min_weight, low=0.0, high=1.0)
        check_number("TailCappedLoss: label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
        check_integer("TailCappedLoss: chunk_size", chunk_size, low=1)
        check_integer("TailCappedLoss: ignore_index", ignore_index)
        check_choice("TailCappedLoss: fused", fused, (False, True))
        self.gamma, self.min_weight, self.ignore_index = float(gamma), float(min_weight), ignore_index
        self.label_smoothing, self.fused, self.chunk_size = float(label_smoothing), fused, chunk_size

    def __repr__(self) -> str:
        return (f"TailCappedLoss(gamma={self.gamma}, min_weight={self.min_weight}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, fused={self.fused}, chunk_size={self.chunk_size})")

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, shift_labels=None, **kwargs):
        """Called as ``(outputs, labels, num_items_in_batch=...)`` by Trainer's compute_loss_func, where ``outputs``
        is the model's output, or as ``(logits=, labels=, vocab_size=, num_items_in_batch=, shift_labels=)`` by a
        model's forward. Extra keyword arguments (such as ``ignore_index``) are ignored: the object's own apply."""
        if hasattr(logits, "logits"):  # a ModelOutput from Trainer.compute_loss
            if self.fused:
                raise ValueError(
                    "TailCappedLoss(fused=True) was given the model's output with full logits, as Trainer's and TRL "
                    "SFTTrainer's compute_loss_func are: the logits are already built, so nothing would be fused. "
                    "For the fused loss: HfExt models take model.loss_function = TailCappedLoss(..., fused=True), "
                    "Llama-family models hf_ext.losses.enable_fused_loss(model, loss) (with transformers' Trainer), "
                    "and under TRL use hf_ext.trl.TailCappedSFTTrainer(..., tail_capped_loss=loss). Or pass "
                    "fused=False to use it as compute_loss_func on full logits.")
            logits = logits.logits
        targets = self._targets(labels, shift_labels, logits.device)
        _check_alignment("logits", logits, targets, labels, shift_labels)
        losses, valid = tail_capped_token_losses(logits.reshape(-1, logits.shape[-1]), targets, self.gamma,
                                                 self.min_weight, self.ignore_index, self.label_smoothing)
        return losses.sum() / self._divisor(num_items_in_batch, valid, losses.device)

    def loss_from_hidden_states(self, hidden_states: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                                num_items_in_batch=None, shift_labels=None, **kwargs) -> torch.Tensor:
        """The same loss from the last hidden states [B, T, d] and the output projection, chunked (fused path)."""
        targets = self._targets(labels, shift_labels, hidden_states.device)
        _check_alignment("hidden_states", hidden_states, targets, labels, shift_labels)
        valid = targets != self.ignore_index
        return fused_linear_tail_capped_loss(
            hidden_states.reshape(-1, hidden_states.shape[-1]), lm_head.weight, targets, lm_head.bias,
            gamma=self.gamma, min_weight=self.min_weight, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, chunk_size=self.chunk_size,
            divisor=self._divisor(num_items_in_batch, valid, hidden_states.device))

    def _targets(self, labels, shift_labels, device) -> torch.Tensor:
        if shift_labels is None:  # tokens < n predict token n, as in transformers' ForCausalLMLoss
            shift_labels = F.pad(labels, (0, 1), value=self.ignore_index)[..., 1:]
        return shift_labels.reshape(-1).to(device)

    @staticmethod
    def _divisor(num_items_in_batch, valid: torch.Tensor, device) -> torch.Tensor:
        if num_items_in_batch is None:
            return valid.sum().clamp(min=1).float()
        if torch.is_tensor(num_items_in_batch):
            if num_items_in_batch.device.type == "cpu":  # a device tensor is not read back: no host sync per step
                _check_num_items(num_items_in_batch.item())
            return num_items_in_batch.to(device=device, dtype=torch.float32)
        _check_num_items(num_items_in_batch)
        return torch.tensor(float(num_items_in_batch), device=device)


def _check_num_items(value) -> None:
    check_number("num_items_in_batch", value, low=0, low_open=True,
                 why="the number of target tokens the loss is divided by; 0 means every label is ignore_index")


def _check_alignment(name: str, scores: torch.Tensor, targets: torch.Tensor, labels, shift_labels) -> None:
    """One target per scored position: misaligned labels would otherwise be reshaped into a wrong loss silently."""
    positions = scores.numel() // scores.shape[-1]
    if targets.numel() != positions:
        given = "shift_labels" if shift_labels is not None else "labels"
        shape = tuple((shift_labels if shift_labels is not None else labels).shape)
        raise ValueError(f"TailCappedLoss: {given} of shape {shape} do not match {name} of shape "
                         f"{tuple(scores.shape)}: expected one label per position, {tuple(scores.shape[:-1])}")
