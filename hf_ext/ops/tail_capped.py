"""The tail-capped (TaiLr) token loss, plain and fused with the output projection.

For a target token with model probability p, TaiLr (Ji et al., ICLR 2023, "Tailoring Language Generation Models
under Total Variation Distance") weights the token's negative log-likelihood by a detached weight::

    w = clamp( p / (γ + (1 − γ)·p),  min_weight, 1 )        loss = −sg[w] · log p

γ = 0 gives w = 1, i.e. cross-entropy; with min_weight = 0 the gradient equals that of the closed form
−log(γ + (1 − γ)p) / (1 − γ). Low-probability (often noisy) targets are down-weighted. With label smoothing ε the
token loss is (1 − ε)·TaiLr + ε·mean_v(−log p_v), the smoothing term not re-weighted (the official criterion).

`tail_capped_token_losses` works on logits [N, V]; `fused_linear_tail_capped_loss` takes hidden states [N, d] and
the output projection [V, d] and processes the tokens in chunks, so that one [chunk, V] fp32 block exists at a time
(plus, for bf16/fp16 weights, the matmul's own [chunk, V] output in that dtype); the softmax is computed once per
chunk, in place, and the same block becomes the logits' gradient.
"""

from __future__ import annotations

import torch

__all__ = ["tail_capped_weights", "tail_capped_token_losses", "fused_linear_tail_capped_loss"]


def _at_least_fp32(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def tail_capped_weights(target_log_probs: torch.Tensor, gamma: float, min_weight: float) -> torch.Tensor:
    """w = clamp(p / (γ + (1 − γ)p), min_weight, 1) from log p [N] (computed in log space; no gradient)."""
    with torch.no_grad():
        log_p = target_log_probs.to(_at_least_fp32(target_log_probs))
        weights = torch.exp(log_p - torch.log(gamma + (1 - gamma) * torch.exp(log_p)))
        return weights.clamp_(min=min_weight, max=1.0)


def tail_capped_token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    min_weight: float = 0.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token tail-capped losses: logits [N, V] (any float dtype, computed in fp32), targets [N] → losses [N]
    (fp32, 0 where ``targets == ignore_index``) and the valid-token mask [N]."""
    valid = targets != ignore_index
    log_probs = torch.log_softmax(logits.to(_at_least_fp32(logits)), dim=-1)
    safe_targets = torch.where(valid, targets, 0)
    target_log_probs = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    losses = -tail_capped_weights(target_log_probs, gamma, min_weight) * target_log_probs
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * log_probs.mean(dim=-1)
    return torch.where(valid, losses, 0.0), valid


class _FusedLinearTailCappedLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients of the hidden states, weight and bias; backward
    only scales them by the incoming gradient. The forward therefore does the work of forward + backward, and the
    backward is free — the pattern of fused linear cross-entropy kernels, here with per-token weights."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, gamma, min_weight, ignore_index, label_smoothing, chunk_size,
                divisor):
        needs_grad = any(ctx.needs_input_grad[:3])  # False under no_grad or for frozen inputs
        num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=_at_least_fp32(hidden), device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if needs_grad and ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros_like(weight, dtype=_at_least_fp32(weight))
                       if needs_grad and ctx.needs_input_grad[1] else None)
        grad_bias = (torch.zeros_like(bias, dtype=_at_least_fp32(bias))
                     if needs_grad and bias is not None and ctx.needs_input_grad[2] else None)
        for start, has_targets in zip(range(0, num_tokens, chunk_size),
                                      _chunks_with_targets(targets, ignore_index, chunk_size)):
            if not has_targets:  # a chunk of prompt or padding only: no logits to build
                continue
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            valid = t != ignore_index
            valid = valid.to(total.dtype)  # a float mask: bool × Python float would be computed in fp32
            safe_t = torch.where(valid > 0, t, 0).unsqueeze(-1)
            # The chunk's one [chunk, V] block: logits, shifted by their row maximum, then exponentiated in place.
            block = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            block = block.to(_at_least_fp32(block))
            block.sub_(block.amax(dim=-1, keepdim=True))
            shifted_target_logits = block.gather(-1, safe_t).squeeze(-1)
            shifted_mean_logits = block.mean(dim=-1) if label_smoothing > 0 else None
            block.exp_()
            row_sums = block.sum(dim=-1)
            log_row_sums = row_sums.log()
            target_log_probs = shifted_target_logits - log_row_sums
            weights = tail_capped_weights(target_log_probs, gamma, min_weight) * valid
            token_losses = -weights * target_log_probs
            if label_smoothing > 0:
                mean_log_probs = shifted_mean_logits - log_row_sums
                token_losses = (1 - label_smoothing) * token_losses - label_smoothing * mean_log_probs * valid
            total += token_losses.sum()
            if needs_grad:
                # d(token loss)/d(logits) = c·softmax − (1 − ε)·w·onehot − ε/V, with c = (1 − ε)·w + ε on valid
                # rows; softmax = block / row_sums, so the row factor c / row_sums turns the block into the gradient.
                scale = (1 - label_smoothing) * weights + label_smoothing * valid
                # In place, under the one name `block`: a second name would keep it alive past the `del` below.
                block.mul_((scale / row_sums).unsqueeze(-1))
                block.scatter_add_(-1, safe_t, (-(1 - label_smoothing) * weights).unsqueeze(-1))
                if label_smoothing > 0:
                    block.sub_((label_smoothing / vocab_size) * valid.unsqueeze(-1))
                _accumulate_chunk_grads(block, h, weight, start, grad_hidden, grad_weight, grad_bias)
            del block  # free the chunk's block before the next chunk's matmul allocates its own
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.div_(divisor)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        # The usual incoming gradient is exactly 1 (loss.backward()): hand the gradients over without a copy.
        unit = bool(grad_output == 1)
        grads = [None if not has else (g if unit else g * grad_output).to(dtype)
                 for g, has, dtype in zip(ctx.saved_tensors, ctx.has_grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None)


def _chunks_with_targets(targets: torch.Tensor, ignore_index: int, chunk_size: int) -> list[bool]:
    """Per chunk of `chunk_size` tokens, whether any target counts: one host read for all chunks (on CUDA a read
    per chunk would stall the stream once per chunk)."""
    counted = targets != ignore_index
    chunks = -(-counted.shape[0] // chunk_size)
    counted = torch.nn.functional.pad(counted, (0, chunks * chunk_size - counted.shape[0]))
    return counted.view(chunks, chunk_size).any(dim=1).tolist()


def _accumulate_chunk_grads(grad_logits, h, weight, start, grad_hidden, grad_weight, grad_bias) -> None:
    """Add one chunk's contribution to the hidden, weight and bias gradients (shapes as in the forward)."""
    low_precision = weight.dtype not in (torch.float32, torch.float64)
    # bf16/fp16 weights: the two products run in the weight dtype (what autograd does for a bf16 lm_head, and
    # several times faster on CPUs with bf16 units); the weight gradient is still summed over chunks in fp32.
    grad_logits_w = grad_logits.to(weight.dtype) if low_precision else grad_logits
    if grad_hidden is not None:
        grad_hidden[start:start + h.shape[0]] = grad_logits_w @ weight
    if grad_weight is not None:
        if low_precision:
            grad_weight.add_(grad_logits_w.T @ h)
        else:
            grad_weight.addmm_(grad_logits.T, h.to(grad_logits.dtype))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def fused_linear_tail_capped_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gamma: float,
    min_weight: float = 0.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int = 1024,
    divisor: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_tokens tail-capped loss of ``hidden @ weight.T (+ bias)`` divided by ``divisor``, without the full logits.

    Shapes: hidden [N, d], weight [V, d], bias [V] or None, targets [N]. ``divisor`` defaults to the number of
    valid targets (pass the Trainer's ``num_items_in_batch`` to make gradient accumulation exact). Peak extra memory
    is one [chunk_size, V] fp32 block plus fp32 gradients of ``weight``; gradients equal those of the unfused
    `tail_capped_token_losses` (tested).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_tail_capped_loss: expected hidden [N, d] and weight [V, d], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_tail_capped_loss: targets must have shape [{hidden.shape[0]}], "
                         f"got {tuple(targets.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fused_linear_tail_capped_loss: chunk_size must be a positive int, got {chunk_size!r}")
    if divisor is None:
        divisor = (targets != ignore_index).sum().clamp(min=1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(device=hidden.device, dtype=_at_least_fp32(hidden))
    return _FusedLinearTailCappedLoss.apply(hidden, weight, bias, targets, float(gamma), float(min_weight),
                                            ignore_index, float(label_smoothing), chunk_size, divisor)
