"""`Lion`: the sign-of-momentum optimizer of Chen et al. (2023) as a standard `torch.optim.Optimizer`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .._validation import check_choice, check_number
from ..ops.lion import (fused_kernel_available, lion_update_foreach, lion_update_fused, lion_update_native,
                        lion_update_single, native_eligible, native_kernel_available)
from ._dtensor import is_dtensor
from ._step_checks import (NONFINITE_GRADS_OPTIONS, SkippedStepReports, check_group_numbers, finite_flags,
                           grads_are_finite, nonfinite_location, raise_nonfinite_after_step)

_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_GROUP_OPTIONS = ("lr", "betas", "weight_decay", "maximize", "foreach", "fused", "state_dtype")  # Lion's own


class Lion(torch.optim.Optimizer):
    """Lion (EvoLved Sign Momentum): one momentum buffer per parameter and a sign update.

    Per parameter, with learning rate η, weight decay λ and gradient g (the paper's Algorithm 2)::

        θ ← θ·(1 − ηλ) − η·sign(β1·m + (1 − β1)·g)
        m ← β2·m + (1 − β2)·g

    Use a learning rate 3–10× smaller than AdamW's and a weight decay 3–10× larger (`adamw_to_lion` does the
    conversion). The state is ``exp_avg`` (m), one tensor per parameter: half of AdamW's.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate η (≥ 0).
        betas: (β1, β2), each in [0, 1). The paper's defaults (0.9, 0.99); (0.95, 0.98) for unstable LM runs.
        weight_decay: decoupled weight decay λ (≥ 0), applied as θ·(1 − ηλ) before the sign step.
        maximize: ascend the objective instead of descending it.
        fused: the kernel that makes one pass over memory per tensor. For float32 parameters on the CPU it is a C
            kernel that updates every tensor in one call (``hf_ext/ops/kernels/lion_fp32.c``, built at the first
            step with the system C compiler in well under a second, logged; ``HF_EXT_NATIVE_KERNELS=0`` turns it
            off); elsewhere (CUDA, bf16/fp16 parameters) it is compiled with ``torch.compile`` (Triton on CUDA, C++
            on the CPU; once per process, a few seconds, logged). On the parameters of SmolLM2-135M on 1 or 2 CPU
            threads the default step takes about 0.75× the time of ``torch.optim.AdamW(fused=True)`` (0.74× on 2
            threads, 0.75× on 1, in ``python -m benchmarks.lion_step_speed``; the memory-traffic floor is 5/7).
            ``None`` (default): use it unless ``foreach`` is given or the parameters are FSDP2 DTensors, and if
            torch.compile cannot build its form here, warn once and use foreach (identical numbers). ``True``: use it
            or raise. ``False``: never.
        foreach: with ``fused`` not chosen, use ``torch._foreach_*`` ops over all tensors of a group (default: yes,
            unless the parameters are FSDP2 DTensors, which take the per-tensor path).
        state_dtype: dtype of the momentum. ``None`` keeps the parameter's dtype; ``torch.float32`` with bf16/fp16
            parameters keeps an fp32 momentum and does the arithmetic in fp32, rounding the parameter once per step.
        nonfinite_grads: what a step does when a gradient holds NaN or inf (one NaN would make the momentum NaN and
            freeze the tensor for good). No parameter or momentum value whose gradient is not finite ever changes.
            ``"raise"`` (default) raises FloatingPointError naming the parameter. Where the C kernel updates every
            tensor (float32 on the CPU) it checks each gradient as it reads it for the update, at no extra cost: the
            elements with a non-finite gradient keep their values, the others take the step, and the error comes
            after it. Elsewhere every gradient is checked first (one more read of each, ``torch.aminmax`` per tensor:
            exact, no overflow; one host sync) and nothing changes. ``"skip"`` skips the whole step (no parameter or
            momentum changes) with a RuntimeWarning, as a gradient scaler does; it always checks first. With the
            fused kernel, ``"skip"`` reads nothing on the host: the update is masked on the device (like a gradient
            scaler's ``found_inf``) and the warning comes once the flags have reached the host (in the same
            ``step()`` on CPU, at a later one on CUDA); a skipped first step leaves the momentum at zero, which is
            what the first real step starts from.
            ``lr`` and ``weight_decay`` are checked again at each step (finite, >= 0): a scheduler may set them.

    All three kernels (per-tensor, foreach, fused) give bit-identical results, equal to ``lion_pytorch.Lion`` and
    bitsandbytes' 32-bit Lion (tested over 100 steps). `load_state_dict` keeps the momentum in the dtype it was
    saved in (torch's base class would cast it to the parameter dtype), so a resumed run continues bit for bit.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        nonfinite_grads: str = "raise",
    ):
        check_number("lr", lr, low=0)
        if isinstance(lr, torch.Tensor):  # the kernels take lr as a Python scalar (alpha=, torch.tensor(lr))
            raise ValueError(f"Lion: lr must be a Python number, not a tensor, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Lion: betas must be two numbers in [0, 1), got {betas!r}")
        for index, beta in enumerate(betas):
            check_number(f"betas[{index}]", beta, low=0, high=1, high_open=True)
        check_number("weight_decay", weight_decay, low=0)
        self.nonfinite_grads = check_choice("nonfinite_grads", nonfinite_grads, NONFINITE_GRADS_OPTIONS)
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(f"Lion: state_dtype must be None or one of {list(_STATE_DTYPES)}, got {state_dtype!r}")
        if foreach and fused:
            raise ValueError("Lion: foreach=True and fused=True are exclusive; choose one kernel")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        fused=fused, state_dtype=state_dtype)
        super().__init__(params, defaults)
        check_group_numbers("Lion", self.param_groups)
        for group in self.param_groups:
            if group["fused"] and any(is_dtensor(p) for p in group["params"]):
                raise ValueError("Lion: fused=True does not support DTensor (FSDP2) parameters; use fused=False")
        self._step_calls = 0  # step() calls, to date the warnings of skipped steps that reach the host later
        self._skip_reports = SkippedStepReports("Lion")

    def __getstate__(self) -> dict:
        # torch's base class keeps only defaults, state and param groups: a deep-copied Lion lost its mode
        return {**super().__getstate__(), "nonfinite_grads": self.nonfinite_grads}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_grads", "raise")
        self._step_calls = 0
        self._skip_reports = SkippedStepReports("Lion")

    def _momentum(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        state = self.state[param]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(param, dtype=group["state_dtype"] or param.dtype,
                                                memory_format=torch.preserve_format)
        return state["exp_avg"]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_group_numbers("Lion", self.param_groups)
        self._step_calls += 1
        self._skip_reports.report(self._step_calls)  # CUDA: steps skipped earlier whose flags have reached the host
        work, labels = [], []  # sparse gradients are refused before any state is created or weight moved
        for group_index, group in enumerate(self.param_groups):
            params = []
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients; use a dense embedding "
                                       "(nn.Embedding(sparse=False)) or a different optimizer for that parameter")
                params.append(param)
                labels.append((group_index, index, tuple(param.shape)))
            if params:
                work.append((group, params, [param.grad for param in params], self._kernel(group, params)))
        # "raise" with the C kernel on every tensor: the kernel checks each gradient while it reads it for the
        # update (no extra pass) and leaves non-finite elements unchanged; the error comes after the step.
        check_in_update = self.nonfinite_grads == "raise" and self._c_kernel_takes_all(work)
        finite = None
        if not check_in_update:
            proceed, finite = self._check_grads(work, labels)
            if not proceed:
                return loss
        nonfinite, offset = [], 0  # labels of the tensors in which the C kernel found a non-finite gradient
        for group, params, grads, kernel in work:
            if group["maximize"]:
                grads = [-grad for grad in grads]
            momenta = [self._momentum(param, group) for param in params]
            beta1, beta2 = group["betas"]
            args = (group["lr"], beta1, beta2, group["weight_decay"])
            if check_in_update:  # every tensor is the C kernel's (`_c_kernel_takes_all`)
                nonfinite += [labels[offset + k] for k in lion_update_native(params, grads, momenta, *args)]
            elif kernel == "fused":
                lion_update_fused(params, grads, momenta, *args, fallback=not group["fused"], finite=finite)
            elif kernel == "foreach":
                lion_update_foreach(params, grads, momenta, *args)
            else:
                for param, grad, momentum in zip(params, grads, momenta):
                    lion_update_single(param, grad, momentum, *args)
            offset += len(params)
        if nonfinite:
            raise_nonfinite_after_step("Lion", nonfinite_location(nonfinite[0]))
        self._skip_reports.report(self._step_calls)  # CPU: this step's flags are on the host already
        return loss

    @staticmethod
    def _kernel(group: dict, params: list) -> str:
        """"fused", "foreach" or "single" (per tensor) for this group's parameters (see the class docstring)."""
        sharded = any(is_dtensor(p) for p in params)
        if group["fused"] or (group["fused"] is None and group["foreach"] is None and not sharded):
            return "fused"
        if group["foreach"] or (group["foreach"] is None and not sharded):
            return "foreach"
        return "single"

    def _c_kernel_takes_all(self, work: list) -> bool:
        """Whether the fused kernel's C form (`hf_ext.ops.lion.native_eligible`: float32, contiguous, CPU) will update
        every tensor of this step, momenta included (those not created yet will be float32 zeros like the parameter,
        unless ``state_dtype`` says otherwise)."""
        if not all(kernel == "fused" for *_, kernel in work) or not native_kernel_available():
            return False
        for group, params, grads, _ in work:
            for param, grad in zip(params, grads):
                momentum = self.state[param].get("exp_avg") if param in self.state else None
                if momentum is None and group["state_dtype"] not in (None, torch.float32):
                    return False
                if not native_eligible(param, grad, param if momentum is None else momentum):
                    return False
        return True

    def _check_grads(self, work: list, labels: list) -> tuple[bool, torch.Tensor | None]:
        """Check every gradient before anything changes. Returns (proceed, finite): proceed False means skip this step
        (warned); ``finite`` is None when the gradients were checked on the host, or a 0-d bool tensor on the device
        with which the fused kernel masks its update.

        The check reads each gradient once (`finite_flags`) and leaves one flag per gradient on the device. "raise"
        reads their conjunction: the step's one host sync (`grads_are_finite`). With the fused kernel in every
        group, "skip" reads nothing: the update is masked with the flag, and the flags reach the host by a queued
        copy (`SkippedStepReports`: the warning comes in this step() on the CPU, at a later one on CUDA). Elsewhere
        (the foreach and per-tensor kernels, FSDP2 shards, other devices) "skip" reads the flag as "raise" does:
        masking them would need a copy of every parameter and momentum."""
        grads = [grad for _, _, group_grads, _ in work for grad in group_grads]
        if not grads:
            return True, None
        if (self.nonfinite_grads == "skip" and fused_kernel_available()
                and all(kernel == "fused" for *_, kernel in work)
                and all(grad.device.type in ("cpu", "cuda") for grad in grads)):
            flags = finite_flags(grads)
            self._skip_reports.post(flags, labels, self._step_calls)
            return True, flags.all()
        return grads_are_finite("Lion", self, self.nonfinite_grads), None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, keeping each momentum in the dtype it was saved in (fp32 state stays fp32).

        A state dict of another optimizer is refused (torch's base class would take AdamW's ``exp_avg`` for Lion's
        momentum and carry on)."""
        for index, state in state_dict["state"].items():
            if set(state) != {"exp_avg"}:
                raise ValueError(f"Lion.load_state_dict: not a Lion state dict: the state of parameter {index} has "
                                 f"keys {sorted(state)}; Lion's has exactly ['exp_avg'] (one momentum per "
                                 "parameter). Was it saved by another optimizer (e.g. AdamW)?")
        for index, group in enumerate(state_dict["param_groups"]):
            missing = sorted(set(_GROUP_OPTIONS) - set(group))
            if missing:
                raise ValueError(f"Lion.load_state_dict: not a Lion state dict: param group {index} lacks Lion's "
                                 f"options {missing} (it has {sorted(k for k in group if k != 'params')})")
        saved_momenta = {index: state["exp_avg"] for index, state in state_dict["state"].items() if "exp_avg" in state}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved_group["params"], group["params"]):
                if index in saved_momenta and saved_momenta[index].shape != param.shape:
                    raise ValueError(f"Lion.load_state_dict: the momentum of parameter {index} has shape "
                                     f"{tuple(saved_momenta[index].shape)}, but the parameter has shape "
                                     f"{tuple(param.shape)}: the state dict belongs to another model or another "
                                     "parameter order")
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, param in zip(saved_group["params"], group["params"]):
                if index in saved_momenta:
                    momentum = saved_momenta[index]
                    self.state[param]["exp_avg"] = momentum.to(device=param.device, copy=True)
