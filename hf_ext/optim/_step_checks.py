"""Checks every hf_ext optimizer runs at each step, before anything changes: finite gradients and sane group values."""

from __future__ import annotations

import warnings

import torch

from .._validation import check_number
from ._dtensor import is_dtensor

NONFINITE_GRADS_OPTIONS = ("raise", "skip")


def check_group_numbers(owner: str, groups: list[dict]) -> None:
    """Each group's ``lr`` and ``weight_decay`` (where present): finite and >= 0. Run at construction and at every
    step, since a scheduler or the caller may set them in between (a few Python comparisons per group)."""
    for index, group in enumerate(groups):
        for key in ("lr", "weight_decay"):
            if key in group:
                check_number(f"{owner} param_groups[{index}][{key!r}]", group[key], low=0)


def grads_are_finite(owner: str, optimizer: torch.optim.Optimizer, mode: str) -> bool:
    """Whether the gradients of ``optimizer``'s parameters are all finite. If not: raise FloatingPointError
    (``mode="raise"``) or warn and return False so that the caller skips the whole step (``mode="skip"``).

    A single non-finite gradient would otherwise make the momentum NaN for good (inf - inf on the next step does the
    same) and freeze the tensor in silence, so this runs before anything changes.
    """
    params = [(g, i, p) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])
              if p.grad is not None]
    if not params:
        return True
    grads = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for _, _, p in params]
    mesh = next((p.grad.device_mesh for _, _, p in params if is_dtensor(p.grad)), None)

    def everywhere(flag: torch.Tensor) -> bool:
        # FSDP2: each rank sees only its shards, so the ranks agree (MIN over the mesh) and all step, skip or raise
        if mesh is not None:
            flag = flag.to(torch.int32)
            for dim in range(mesh.ndim):
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
        return bool(flag)

    # The L2 norm of a tensor is finite when all its values are, and torch._foreach_norm computes all of them in one
    # fused pass (on CPU it is also many times faster than the max-abs norm or isfinite); the bool() in everywhere()
    # is the only host sync of a normal step, where a per-tensor check would stall a GPU once per tensor. A norm can
    # also overflow for finite values (fp16 beyond 65504): such tensors alone are checked value by value.
    norms = torch._foreach_norm(grads, 2)
    norm_finite = torch.stack([n.to(norms[0].device) for n in norms]).isfinite()
    if everywhere(norm_finite.all()):
        return True
    bad = [k for k, ok in enumerate(norm_finite.tolist()) if not ok and not torch.isfinite(grads[k]).all()]
    if everywhere(torch.tensor(not bad, device=norms[0].device)):
        return True
    if bad:
        group_index, index, param = params[bad[0]]
        where = f"the gradient of parameter {index} of param group {group_index} (shape {tuple(param.shape)})"
    else:
        where = "the gradient of a parameter shard held by another rank"
    if mode == "skip":
        warnings.warn(f"{owner}: skipped a step (no parameter or state changed): {where} is not finite (NaN or inf); "
                      "the loss was probably NaN or inf (e.g. an fp16 overflow)", RuntimeWarning, stacklevel=3)
        return False
    raise FloatingPointError(
        f"{owner}: {where} is not finite (NaN or inf), so the step was refused before any parameter or state changed. "
        "The loss was probably NaN or inf (e.g. an fp16 overflow): clip gradients (torch.nn.utils.clip_grad_norm_), "
        'lower the learning rate, or pass nonfinite_grads="skip" to skip such steps')
