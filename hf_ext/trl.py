"""TRL: the tail-capped (TaiLr) loss under `SFTTrainer`, computed through TRL's own chunked LM head.

`SFTTrainer` computes its loss itself: it projects the last hidden states through the LM head in tiles (TRL's fused
LM head, which never builds the [tokens, vocab] logits) and averages −log p of the target tokens. It never calls
``model.loss_function``, so a `TailCappedLoss` set there — or installed by `hf_ext.losses.enable_fused_loss` — is
not what SFTTrainer trains. `TailCappedSFTTrainer` keeps SFTTrainer's path and weights each target's −log p by the
tail-capped weight; ``compute_loss_func=TailCappedLoss(gamma)`` (unfused) also works with SFTTrainer, at the cost of
the full logits and a second, gradient-free forward for SFTTrainer's metrics.

Requires ``trl`` (``pip install trl``).
"""

from __future__ import annotations

import trl
from trl import SFTTrainer

from .losses import TailCappedLoss
from .ops.tail_capped import tail_capped_weights


class TailCappedSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose loss is TaiLr's tail-capped cross-entropy, without full logits.

    Each target token's −log p from SFTTrainer's chunked LM head is weighted by w = clamp(p/(γ + (1 − γ)p),
    min_weight, 1), with no gradient through w — the loss `TailCappedLoss` computes, summed over target tokens and
    divided as SFTTrainer divides. Training and evaluation both use it; SFTTrainer's metrics (entropy, token
    accuracy) are unchanged.

    Args:
        tail_capped_loss: the `TailCappedLoss` to train with. Its ``fused`` flag does not matter here (the loss always
            goes through TRL's chunked head); ``label_smoothing`` must be 0 (the head returns the targets'
            log-probabilities only) and ``ignore_index`` -100 (TRL's label padding).
        *args, **kwargs: as `trl.SFTTrainer`.

    Example:
        >>> from hf_ext.losses import TailCappedLoss
        >>> from hf_ext.trl import TailCappedSFTTrainer
        >>> trainer = TailCappedSFTTrainer(model, args=args, train_dataset=dataset,  # doctest: +SKIP
        ...                                tail_capped_loss=TailCappedLoss(gamma=1e-7, min_weight=0.2))
    """

    def __init__(self, *args, tail_capped_loss: TailCappedLoss, **kwargs):
        if not isinstance(tail_capped_loss, TailCappedLoss):
            raise ValueError(f"TailCappedSFTTrainer: tail_capped_loss must be a TailCappedLoss, got "
                             f"{tail_capped_loss!r}")
        if tail_capped_loss.label_smoothing != 0:
            raise ValueError("TailCappedSFTTrainer: label_smoothing must be 0, because TRL's chunked LM head returns "
                             "only the targets' log-probabilities; for a smoothed loss use SFTTrainer(..., "
                             "compute_loss_func=TailCappedLoss(gamma, label_smoothing=...)), which builds full logits")
        if tail_capped_loss.ignore_index != -100:
            raise ValueError(f"TailCappedSFTTrainer: ignore_index must be -100 (TRL masks labels with -100), got "
                             f"{tail_capped_loss.ignore_index}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("TailCappedSFTTrainer computes the tail-capped loss itself; leave compute_loss_func unset")
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_type", "nll") != "nll":
            raise ValueError(f"TailCappedSFTTrainer: SFTConfig.loss_type must be 'nll' (the tail-capped weights "
                             f"replace it), got {self.args.loss_type!r}")
        if self.label_smoother is not None:
            raise ValueError("TailCappedSFTTrainer: label_smoothing_factor must be 0 in the training arguments; "
                             "SFTTrainer's label smoother would replace the tail-capped loss")
        self.tail_capped_loss = tail_capped_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # SFTTrainer patched the forward of this module (the base model under PEFT) with its fused LM head. The hook
        # lives only for this call: the model itself is left as it was, for other trainers and for inference.
        patched = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hook = patched.register_forward_hook(self._weight_target_log_probs, with_kwargs=True)
        self._weighted_calls = 0
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            hook.remove()
        if self._weighted_calls == 0:  # never train plain cross-entropy under this trainer's name
            raise RuntimeError("TailCappedSFTTrainer: SFTTrainer computed this loss without its fused LM head "
                               f"(trl {trl.__version__}), so the tail-capped weights were not applied. With a TRL "
                               "whose SFTTrainer calls the model's own loss, use SFTTrainer with "
                               "model.loss_function = TailCappedLoss(...) or compute_loss_func=TailCappedLoss(...).")
        return result

    def _weight_target_log_probs(self, module, args, kwargs, output):
        """Turn the fused head's per-target log p into w·log p; SFTTrainer's loss −Σ/count is then TaiLr's."""
        if not kwargs.get("fused_lm_head") or getattr(output, "log_probs", None) is None:
            return output
        self._weighted_calls += 1
        loss = self.tail_capped_loss
        log_probs = output.log_probs
        weighted = tail_capped_weights(log_probs, loss.gamma, loss.min_weight).to(log_probs.dtype) * log_probs
        output.log_probs = weighted  # zero where the label is -100, as before
        if getattr(output, "label_mask", None) is not None:
            output.loss = -weighted.sum() / output.label_mask.sum().clamp(min=1)
        return output
