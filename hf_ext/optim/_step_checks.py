"""Checks every hf_ext optimizer runs at each step: finite gradients (before anything changes, except where Lion's C
kernel checks them during its update pass) and sane group values."""

from __future__ import annotations

import collections
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


def finite_flags(grads: list[torch.Tensor]) -> torch.Tensor:
    """One bool per tensor of ``grads``: are all its values finite? A vector on the first tensor's device, computed
    without a host sync.

    `torch.aminmax` reads each tensor once and propagates NaN (documented), and ±inf shows up as the minimum or the
    maximum, so both ends are finite exactly when every value is; unlike a sum or a norm it cannot overflow on large
    finite values. On the gradients of SmolLM2-135M on 2 CPU threads it takes 13 ms, against 21 ms for
    ``torch._foreach_norm`` and 25-35 ms for a torch.compile'd ``isfinite(g).all()`` per tensor (whose ~30 µs of
    call overhead, 211 times, outweighs the kernel).

    On CUDA a loop over tensors is one kernel launch per tensor (hundreds per step); there the check is
    `_flags_from_max_magnitudes`, one multi-tensor kernel, exact for the same reasons."""
    device = grads[0].device
    if device.type == "cuda":
        return _flags_from_max_magnitudes(grads)
    ends = []
    for grad in grads:
        if grad.is_complex():
            grad = torch.view_as_real(grad)
        if grad.numel():
            ends.extend(end.to(device) for end in torch.aminmax(grad))
        else:  # aminmax refuses empty tensors; they hold no non-finite value
            ends.extend([torch.zeros((), device=device)] * 2)
    return torch.stack(ends).isfinite().view(-1, 2).all(dim=1)  # stack promotes mixed dtypes exactly (inf stays inf)


def _flags_from_max_magnitudes(grads: list[torch.Tensor]) -> torch.Tensor:
    """`finite_flags` from each tensor's largest magnitude (``torch._foreach_norm`` of order ∞): a maximum cannot
    overflow, NaN propagates through it and ±inf is its own magnitude. One launch for all tensors on CUDA; on the
    CPU torch computes it an order of magnitude slower than `torch.aminmax`, hence the split."""
    device = grads[0].device
    reals = [torch.view_as_real(grad) if grad.is_complex() else grad for grad in grads]
    filled = [index for index, grad in enumerate(reals) if grad.numel()]  # the ∞-norm of nothing is undefined
    flags = torch.ones(len(grads), dtype=torch.bool, device=device)  # an empty tensor holds no non-finite value
    if filled:
        magnitudes = torch._foreach_norm([reals[index] for index in filled], float("inf"))
        # float64 holds every float dtype's largest finite value (float32 would overflow on float64 gradients)
        flags[filled] = torch.stack([m.to(device, torch.float64) for m in magnitudes]).isfinite()
    return flags


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

    flags = finite_flags(grads)
    if everywhere(flags.all()):  # the one host sync of a normal step
        return True
    bad = [k for k, ok in enumerate(flags.tolist()) if not ok]
    if bad:
        group_index, index, param = params[bad[0]]
        where = nonfinite_location((group_index, index, tuple(param.shape)))
    else:
        where = "the gradient of a parameter shard held by another rank"
    refuse_nonfinite(owner, where, mode, stacklevel=4)
    return False


def nonfinite_location(label: tuple[int, int, tuple[int, ...]]) -> str:
    """The words for the gradient of the parameter labelled (param group index, index in the group, shape)."""
    group_index, index, shape = label
    return f"the gradient of parameter {index} of param group {group_index} (shape {shape})"


# what to do about it, in both forms of the "raise" error
_REMEDY = ("The loss was probably NaN or inf (e.g. an fp16 overflow): clip gradients (torch.nn.utils.clip_grad_norm_), "
           'lower the learning rate, or pass nonfinite_grads="skip" to skip such steps')


def refuse_nonfinite(owner: str, where: str, mode: str, stacklevel: int = 3, note: str = "") -> None:
    """Raise the FloatingPointError of ``mode="raise"``, or warn that a step was skipped (``mode="skip"``)."""
    if mode == "skip":
        warnings.warn(f"{owner}: skipped a step (no parameter or state changed): {where} is not finite (NaN or inf); "
                      f"the loss was probably NaN or inf (e.g. an fp16 overflow){note}", RuntimeWarning,
                      stacklevel=stacklevel)
        return
    raise FloatingPointError(f"{owner}: {where} is not finite (NaN or inf), so the step was refused before any "
                             f"parameter or state changed. {_REMEDY}")


def raise_nonfinite_after_step(owner: str, where: str) -> None:
    """The FloatingPointError of ``mode="raise"`` where the kernel checked the gradients while updating (Lion's C
    kernel): the non-finite elements kept their values, the rest took the step."""
    raise FloatingPointError(
        f"{owner}: {where} is not finite (NaN or inf). The elements whose gradient is not finite kept their parameter "
        "and state values; every other element took this step (the fused CPU kernel checks each gradient as it "
        f"reads it for the update, at no extra cost). {_REMEDY} whole (no parameter or state changes; it reads every "
        "gradient once more)")


def copy_done_event(device: torch.device):
    """An event that completes once the work queued so far on ``device`` has run (CUDA), or None where queued work
    has already run when the call returns (CPU)."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return event
    return None


class SkippedStepReports:
    """Warnings for the steps that a sync-free "skip" path skipped.

    Such a step computes its per-gradient finiteness flags on the device and masks its update with them; reading the
    flags on the host at once would make the host wait for the GPU, every step. Instead `post` queues a copy of the
    flags into (pinned) host memory, and `report` reads the copies that have landed, in order, and warns for each
    skipped step: on the CPU in the same step() call, on CUDA at a later one."""

    def __init__(self, owner: str):
        self.owner = owner
        self._pending: collections.deque = collections.deque()  # (event or None, host flags, labels, step number)

    def post(self, flags: torch.Tensor, labels: list, step_number: int) -> None:
        """Queue the copy of ``flags`` (bool vector, one per labelled gradient) to the host; nothing waits."""
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=flags.device.type == "cuda")
        host.copy_(flags, non_blocking=True)
        self._pending.append((copy_done_event(flags.device), host, labels, step_number))

    def report(self, current_step: int) -> None:
        """Warn for every skipped step whose flags have landed on the host; never waits for the device."""
        while self._pending:
            event, host, labels, step_number = self._pending[0]
            if event is not None and not event.query():
                return  # still queued on the device; the later ones are behind it
            self._pending.popleft()
            flags = host.tolist()  # host memory that the copy has filled: no wait
            if all(flags):
                continue
            late = f". That was step() call {step_number}, reported once the device had run it"
            refuse_nonfinite(self.owner, nonfinite_location(labels[flags.index(False)]), "skip", stacklevel=4,
                             note=late if step_number != current_step else "")
