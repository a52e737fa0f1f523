"""The Lion update (Chen et al. 2023) as three interchangeable kernels with bit-identical results.

For one parameter tensor θ with gradient g and momentum m (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv 2302.06675)::

    θ ← θ · (1 − η·λ)                      # decoupled weight decay, uses θ_{t−1}
    c  = β1·m + (1 − β1)·g                  # interpolation, used only for the direction
    θ ← θ − η · sign(c)                     # sign(0) = 0: no move
    m ← β2·m + (1 − β2)·g                   # momentum update after the parameter update

Every kernel performs the same floating-point operations in the same order, so the three agree bit for bit:

* `lion_update_single`  — one tensor at a time (works on anything, including FSDP2 DTensors);
* `lion_update_foreach` — the same ops through ``torch._foreach_*`` over a list of tensors;
* `lion_update_fused`   — the same ops compiled with ``torch.compile`` into one pass over memory per tensor
  (the update is memory-bound: it reads θ, g, m and writes θ, m, five tensors of traffic, so one pass is what
  makes it fast).

Low-precision parameters (bf16/fp16) may keep their momentum in fp32: the arithmetic then runs in fp32 on a
copy of θ that is rounded back once per step. Gradients are read in their own dtype and promoted.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

__all__ = ["lion_update_single", "lion_update_foreach", "lion_update_fused", "lion_reference_float64"]


def _compute_dtype(momentum: torch.Tensor) -> torch.dtype:
    # bf16/fp16 state is updated in fp32 and rounded once, so that every kernel rounds at the same places.
    return torch.float64 if momentum.dtype == torch.float64 else torch.float32


def lion_update_single(param, grad, momentum, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """Apply one Lion step in place to ``param`` [any shape] and ``momentum`` [same shape] from ``grad``."""
    dtype = _compute_dtype(momentum)
    work, moment, grad = param.to(dtype), momentum.to(dtype), grad.to(dtype)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    direction = moment.mul(beta1).add_(grad, alpha=1 - beta1).sign_()  # add with alpha is a fused multiply-add
    work.add_(direction, alpha=-lr)
    moment.mul_(beta2).add_(grad, alpha=1 - beta2)
    for target, value in ((param, work), (momentum, moment)):
        if value is not target:
            target.copy_(value)


def lion_update_foreach(params, grads, momenta, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """`lion_update_single` over lists of tensors with ``torch._foreach_*`` ops (same arithmetic, fewer calls)."""
    dtypes = [_compute_dtype(m) for m in momenta]
    work = [p.to(d) for p, d in zip(params, dtypes)]
    moments = [m.to(d) for m, d in zip(momenta, dtypes)]
    grads = [g.to(d) for g, d in zip(grads, dtypes)]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    direction = torch._foreach_mul(moments, beta1)
    torch._foreach_add_(direction, grads, alpha=1 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(work, direction, alpha=-lr)
    torch._foreach_mul_(moments, beta2)
    torch._foreach_add_(moments, grads, alpha=1 - beta2)
    for targets, values in ((params, work), (momenta, moments)):
        for target, value in zip(targets, values):
            if value is not target:
                target.copy_(value)


def _lion_update_flat(param, grad, momentum, lr, beta1, beta2, weight_decay):
    # The same operations as `lion_update_single` on 1-D views, written out of place so that the compiler fuses
    # them into one loop. Hyper-parameters arrive as 0-d float64 tensors (a learning-rate schedule must not
    # recompile). `prims.fma` reproduces eager's `add(x, alpha=a)`, which is a fused multiply-add; a plain
    # `x * a + y` would round twice and drift from the other kernels.
    dtype = _compute_dtype(momentum)
    work, moment, grad = param.to(dtype), momentum.to(dtype), grad.to(dtype)
    work = work * (1 - lr * weight_decay)
    direction = torch.sign(torch.ops.prims.fma(grad, (1 - beta1).to(dtype).expand_as(grad), moment * beta1))
    param.copy_(work - direction * lr.to(dtype))  # direction is -1, 0 or 1, so the product is exact
    momentum.copy_(torch.ops.prims.fma(grad, (1 - beta2).to(dtype).expand_as(grad), moment * beta2))


# Below this size a compiled call's fixed cost (~30 µs) outweighs its saving; such tensors go through foreach.
FUSED_MIN_NUMEL = 32768
_compiled_flat = None
_compile_failure: str | None = None  # why torch.compile could not build the kernel here, once it has failed


def lion_update_fused(params, grads, momenta, lr: float, beta1: float, beta2: float, weight_decay: float,
                      *, fallback: bool = False) -> None:
    """`lion_update_foreach` with one compiled memory pass per large tensor (``torch.compile``: C++ on CPU, Triton on
    CUDA).

    One kernel, compiled on the first call with a dynamic length (a few seconds, logged; cached on disk by torch),
    serves every contiguous tensor of at least `FUSED_MIN_NUMEL` elements; the rest take the foreach kernel. Results
    are identical to the other kernels (tested). If the compiler cannot build the kernel, ``fallback=False`` raises;
    ``fallback=True`` (Lion's default kernel choice) warns once and updates the remaining tensors, then and on later
    calls, with the foreach kernel — the same numbers, only slower.
    """
    global _compiled_flat, _compile_failure
    if fallback and _compile_failure is not None:
        lion_update_foreach(params, grads, momenta, lr, beta1, beta2, weight_decay)
        return
    if _compiled_flat is None:
        logger.info("Lion: compiling the fused update kernel with torch.compile (once per process, a few seconds)")
        _compiled_flat = torch.compile(_lion_update_flat, fullgraph=True, dynamic=True)
    hyper = [torch.tensor(value, dtype=torch.float64) for value in (lr, beta1, beta2, weight_decay)]
    small, compiled = ([], [], []), True
    # Each dtype combination and tensor rank compiles once; allow more variants than dynamo's default of 8 (the
    # setting is `recompile_limit` since torch 2.7, `cache_size_limit` before).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 64}):
        for param, grad, momentum in zip(params, grads, momenta):
            tensors = (param, grad, momentum)
            if compiled and param.numel() >= FUSED_MIN_NUMEL and all(t.is_contiguous() for t in tensors):
                try:
                    _compiled_flat(*(t.view(-1) for t in tensors), *hyper)
                    continue
                except Exception as error:  # the compiler backend is missing or broken on this machine
                    if not fallback:
                        raise RuntimeError("Lion(fused=True): torch.compile could not build the fused update kernel "
                                           f"({type(error).__name__}: {error}); use fused=False (the foreach kernel "
                                           "gives identical results)") from error
                    # compiling fails before the kernel touches its tensors: this one and the rest go to foreach
                    compiled, _compile_failure = False, f"{type(error).__name__}: {error}"
                    warnings.warn(f"Lion: torch.compile could not build the fused update kernel ({_compile_failure}); "
                                  "using the foreach kernel from now on (identical results, slower). Pass fused=False "
                                  "to choose it without trying.", RuntimeWarning, stacklevel=3)
            for bucket, tensor in zip(small, tensors):
                bucket.append(tensor)
    if small[0]:
        lion_update_foreach(*small, lr, beta1, beta2, weight_decay)


def lion_reference_float64(param, grad, momentum, lr, beta1, beta2, weight_decay):
    """The paper's formula in float64, out of place: returns (new_param, new_momentum). For tests."""
    param, grad, momentum = (t.double() for t in (param, grad, momentum))
    direction = torch.sign(beta1 * momentum + (1 - beta1) * grad)
    new_param = param - lr * (direction + weight_decay * param)
    new_momentum = beta2 * momentum + (1 - beta2) * grad
    return new_param, new_momentum
