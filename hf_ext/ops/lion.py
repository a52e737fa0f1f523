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
* `lion_update_fused`   — one pass over memory per tensor (the update is memory-bound: it reads θ, g, m and writes
  θ, m, five tensors of traffic, so one pass is what makes it fast): for float32 tensors on the CPU a C kernel
  that updates all of them in one call (`lion_update_native`, ``kernels/lion_fp32.c``), elsewhere the same ops
  compiled with ``torch.compile`` (Triton on CUDA, C++ on the CPU for other dtypes).

Low-precision parameters (bf16/fp16) may keep their momentum in fp32: the arithmetic then runs in fp32 on a
copy of θ that is rounded back once per step. Gradients are read in their own dtype and promoted.
"""

from __future__ import annotations

import ctypes
import logging
import warnings

import torch

from . import native

logger = logging.getLogger(__name__)

__all__ = ["lion_update_single", "lion_update_foreach", "lion_update_fused", "lion_update_native",
           "lion_reference_float64"]


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


def lion_update_foreach(params, grads, momenta, lr: float, beta1: float, beta2: float, weight_decay: float,
                        *, finite: torch.Tensor | None = None) -> None:
    """`lion_update_single` over lists of tensors with ``torch._foreach_*`` ops (same arithmetic, fewer calls).

    ``finite``: an optional 0-d bool tensor; where it is False nothing changes, and no value is read on the host
    (see `_masked_foreach`)."""
    if finite is not None:
        _masked_foreach(params, grads, momenta, lr, beta1, beta2, weight_decay, finite)
        return
    dtypes = [_compute_dtype(m) for m in momenta]
    work = [p.to(d) for p, d in zip(params, dtypes)]
    moments = [m.to(d) for m, d in zip(momenta, dtypes)]
    grads = [g.to(d) for g, d in zip(grads, dtypes)]
    _foreach_steps(work, grads, moments, lr, beta1, beta2, weight_decay)
    for targets, values in ((params, work), (momenta, moments)):
        for target, value in zip(targets, values):
            if value is not target:
                target.copy_(value)


def _foreach_steps(work, grads, moments, lr, beta1, beta2, weight_decay) -> None:
    # the Lion update in place on `work` (parameters) and `moments`, in the compute dtype
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    direction = torch._foreach_mul(moments, beta1)
    torch._foreach_add_(direction, grads, alpha=1 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(work, direction, alpha=-lr)
    torch._foreach_mul_(moments, beta2)
    torch._foreach_add_(moments, grads, alpha=1 - beta2)


_MASKED_CHUNK_NUMEL = 1 << 22  # the masked foreach form copies at most this many elements (or one tensor) at a time


def _masked_foreach(params, grads, momenta, lr, beta1, beta2, weight_decay, finite) -> None:
    # The foreach update on copies, then torch.where(finite, new, old) into each tensor: the same numbers when
    # `finite` holds, nothing changed when not, no host sync either way. It serves the small tensors of the fused
    # path (and all of them if torch.compile fails mid-step); the copies go in chunks to bound the extra memory.
    flags = _PerDevice(lambda device: finite.to(device))
    start = 0
    while start < len(params):
        stop, numel = start, 0
        while stop < len(params) and (stop == start or numel + params[stop].numel() <= _MASKED_CHUNK_NUMEL):
            numel += params[stop].numel()
            stop += 1
        chunk = slice(start, stop)
        dtypes = [_compute_dtype(m) for m in momenta[chunk]]
        work = [p.to(d, copy=True) for p, d in zip(params[chunk], dtypes)]
        moments = [m.to(d, copy=True) for m, d in zip(momenta[chunk], dtypes)]
        chunk_grads = [g.to(d) for g, d in zip(grads[chunk], dtypes)]
        _foreach_steps(work, chunk_grads, moments, lr, beta1, beta2, weight_decay)
        for targets, values in ((params[chunk], work), (momenta[chunk], moments)):
            for target, value in zip(targets, values):
                target.copy_(torch.where(flags[target.device], value, target))
        start = stop


def _lion_update_flat(param, grad, momentum, scalars, finite):
    # The same operations as `lion_update_single` on 1-D views, written out of place so that the compiler fuses
    # them into one loop. `scalars` (see `_step_scalars`) holds the step's numbers as a float64 vector on the
    # tensors' device: tensors, so that a learning-rate schedule does not recompile, and on the device, so that the
    # same code serves CPU and CUDA. They are cast to the compute dtype here, as eager casts a Python number.
    # `prims.fma` reproduces eager's `add(x, alpha=a)`, which is a fused multiply-add; a plain `x * a + y` would
    # round twice and drift from the other kernels. Every `a * b + c` is written as an explicit fma for a second
    # reason: Triton contracts a plain multiply-add into an fma on its own (C++ is built with -ffp-contract=off), and
    # `decayed - direction * lr` might become fma(work, decay, ·), which rounds differently from eager's `mul_`.
    # `finite` (0-d bool) masks the whole update: skipping a step with non-finite gradients needs no host sync.
    dtype = _compute_dtype(momentum)
    scalars = scalars.to(dtype)
    decay, minus_lr, beta1, one_minus_beta1, beta2, one_minus_beta2 = (scalars[k] for k in range(6))
    work, moment, grad = param.to(dtype), momentum.to(dtype), grad.to(dtype)
    fma = torch.ops.prims.fma  # prims take no broadcasting: the scalars are expanded
    direction = torch.sign(fma(grad, one_minus_beta1.expand_as(grad), moment * beta1))
    new_param = fma(direction, minus_lr.expand_as(grad), work * decay)  # direction is -1, 0 or 1: an exact product
    new_momentum = fma(grad, one_minus_beta2.expand_as(grad), moment * beta2)
    param.copy_(torch.where(finite, new_param, work))
    momentum.copy_(torch.where(finite, new_momentum, moment))


def _step_scalars(lr, beta1, beta2, weight_decay, device: torch.device) -> torch.Tensor:
    """The fused kernel's numbers as one float64 vector on ``device``, computed here in Python floats exactly as the
    eager kernels compute them (so the compiler cannot contract ``1 - lr·λ`` into another rounding). On CUDA it is
    queued from pinned memory (``non_blocking``): a plain host-to-device copy would wait for the GPU."""
    values = [1 - lr * weight_decay, -lr, beta1, 1 - beta1, beta2, 1 - beta2]
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.float64, pin_memory=pinned).to(device, non_blocking=pinned)


class _PerDevice(dict):
    """``make(device)`` once per device (parameters of one model may sit on several GPUs)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, device):
        self[device] = value = self.make(device)
        return value


# Below this size a compiled call's fixed cost (~30 µs) outweighs its saving; such tensors go through foreach.
FUSED_MIN_NUMEL = 32768
_compiled_flat = None  # the compiled `_lion_update_flat`
_compile_failure: str | None = None  # why torch.compile could not build the kernel here, once it has failed


def _compiled_update():
    """`_lion_update_flat` compiled lazily, on the first call (a few seconds, logged; cached on disk by torch), with a
    dynamic length so that one build serves every tensor size. Nothing in it depends on the device: inductor emits
    C++ on CPU and Triton on CUDA from the same function."""
    global _compiled_flat
    if _compiled_flat is None:
        logger.info("Lion: compiling the fused update kernel with torch.compile (once per process, a few seconds)")
        _compiled_flat = torch.compile(_lion_update_flat, fullgraph=True, dynamic=True)
    return _compiled_flat


def fused_kernel_available() -> bool:
    """False once torch.compile has failed to build the fused kernel in this process."""
    return _compile_failure is None


def _recompile_limit():
    # Each dtype combination and tensor rank compiles once; allow more variants than dynamo's default of 8 (the
    # setting is `recompile_limit` since torch 2.7, `cache_size_limit` before).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    return torch._dynamo.config.patch(**{limit: 64})


def _compile_failed(error: Exception, fallback: bool, stacklevel: int) -> None:
    """Raise (``fallback=False``) or record the failure and warn once (the caller then takes the foreach kernel)."""
    global _compile_failure
    if not fallback:
        raise RuntimeError("Lion(fused=True): torch.compile could not build the fused update kernel "
                           f"({type(error).__name__}: {error}); use fused=False (the foreach kernel "
                           "gives identical results)") from error
    _compile_failure = f"{type(error).__name__}: {error}"
    warnings.warn(f"Lion: torch.compile could not build the fused update kernel ({_compile_failure}); "
                  "using the foreach kernel from now on (identical results, slower). Pass fused=False "
                  "to choose it without trying.", RuntimeWarning, stacklevel=stacklevel + 1)


def _fused_eligible(*tensors) -> bool:
    return tensors[0].numel() >= FUSED_MIN_NUMEL and all(t.is_contiguous() for t in tensors)


def lion_update_fused(params, grads, momenta, lr: float, beta1: float, beta2: float, weight_decay: float,
                      *, fallback: bool = False, finite: torch.Tensor | None = None) -> list[int]:
    """`lion_update_foreach` in one pass over memory per tensor.

    Float32 tensors on the CPU (`native_eligible`) go through the C kernel of `lion_update_native`, all in one
    call (built at first use in a fraction of a second, logged). The rest go through ``torch.compile``: one kernel,
    compiled on the first call with a dynamic length (a few seconds, logged; cached on disk by torch), serves every
    contiguous tensor of at least `FUSED_MIN_NUMEL` elements (Triton on CUDA, C++ on the CPU), and smaller ones take
    the foreach kernel. Results are identical to the other kernels (tested).

    ``finite``: an optional 0-d bool tensor (e.g. the ``.all()`` of `hf_ext.optim._step_checks.finite_flags`);
    where it is False, no parameter or momentum changes, and no value is read on the host (except on the CPU, where
    reading it costs nothing). If the compiler cannot build the torch.compile kernel, ``fallback=False`` raises;
    ``fallback=True`` (Lion's default kernel choice) warns once and updates the remaining tensors, then and on later
    calls, with the foreach kernel — the same numbers, only slower.

    Returns the indices (into ``params``) of the tensors that the C kernel found with a non-finite gradient: it
    leaves those elements unchanged (see `lion_update_native`). The other paths do not look.
    """
    native_side = []
    if (finite is None or finite.device.type == "cpu") and native_kernel_available():
        native_side = [k for k, tensors in enumerate(zip(params, grads, momenta)) if native_eligible(*tensors)]
    nonfinite = []
    if native_side and (finite is None or bool(finite)):
        found = lion_update_native(*([ts[k] for k in native_side] for ts in (params, grads, momenta)),
                                   lr, beta1, beta2, weight_decay)
        nonfinite = [native_side[k] for k in found]
    if len(native_side) < len(params):
        taken = set(native_side)
        rest = ([t for k, t in enumerate(ts) if k not in taken] for ts in (params, grads, momenta))
        _compiled_update_or_foreach(*rest, lr, beta1, beta2, weight_decay, fallback=fallback, finite=finite)
    return nonfinite


def _compiled_update_or_foreach(params, grads, momenta, lr, beta1, beta2, weight_decay, *, fallback, finite) -> None:
    # the torch.compile side of `lion_update_fused`
    if fallback and _compile_failure is not None:
        lion_update_foreach(params, grads, momenta, lr, beta1, beta2, weight_decay, finite=finite)
        return
    update = _compiled_update()
    scalars = _PerDevice(lambda device: _step_scalars(lr, beta1, beta2, weight_decay, device))
    flags = _PerDevice(lambda device: (torch.ones((), dtype=torch.bool, device=device) if finite is None
                                       else finite.to(device)))
    rest, compiled = ([], [], []), True
    with _recompile_limit():
        for param, grad, momentum in zip(params, grads, momenta):
            tensors = (param, grad, momentum)
            if compiled and _fused_eligible(*tensors):
                try:
                    update(*(t.view(-1) for t in tensors), scalars[param.device], flags[param.device])
                    continue
                except Exception as error:  # the compiler backend is missing or broken on this machine
                    # compiling fails before the kernel touches its tensors: this one and the rest go to foreach
                    _compile_failed(error, fallback, stacklevel=4)
                    compiled = False
            for bucket, tensor in zip(rest, tensors):
                bucket.append(tensor)
    if rest[0]:
        lion_update_foreach(*rest, lr, beta1, beta2, weight_decay, finite=finite)


# ---- the C kernel: float32 on the CPU, every tensor in one call ------------------------------------------------------

NATIVE_CHUNK_NUMEL = 1 << 16  # elements per unit of work that the C kernel's threads share (256 KiB per tensor)
_NATIVE_KERNEL = "lion_fp32"
_POINTER = ctypes.c_void_p


def _native_function():
    """The C kernel's entry point, or None where it cannot be built here (see `hf_ext.ops.native`)."""
    library = native.load(_NATIVE_KERNEL)
    if library is None:
        return None
    function = library.hf_ext_lion_fp32
    if function.argtypes is None:
        function.restype = None
        function.argtypes = ([ctypes.c_int64] + [_POINTER] * 6 + [ctypes.c_float] * 6 + [_POINTER, ctypes.c_int])
    return function


def native_kernel_available() -> bool:
    """Whether the C kernel of `lion_update_native` is built, or can be built, in this process."""
    return _native_function() is not None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # not DTensors or other subclasses with their own storage


def native_eligible(param, grad, momentum) -> bool:
    """Whether `lion_update_native` takes this tensor: float32 parameter, gradient and momentum, dense and
    contiguous, on the CPU."""
    return _plain_float32_on_cpu(param) and _plain_float32_on_cpu(grad) and _plain_float32_on_cpu(momentum)


def _plain_float32_on_cpu(t: torch.Tensor) -> bool:
    # identity tests and `is_cpu`: this runs for every tensor at every step (a `device` object costs a microsecond)
    return (t.dtype is torch.float32 and t.is_cpu and t.layout is torch.strided and type(t) in _PLAIN_TENSOR_TYPES
            and t.is_contiguous())


def _chunk_table(sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tensor index, first element, length) of each chunk of tensors of ``sizes``. The last table is kept, since a
    training run asks for the same one at every step (one tuple, read and rebound whole: safe across threads)."""
    global _last_chunk_table
    key = (sizes, NATIVE_CHUNK_NUMEL)
    cached_key, cached_table = _last_chunk_table
    if cached_key == key:
        return cached_table
    sizes_tensor = torch.tensor(sizes, dtype=torch.int64)
    counts = (sizes_tensor + NATIVE_CHUNK_NUMEL - 1) // NATIVE_CHUNK_NUMEL  # an empty tensor has no chunk
    tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start = (torch.arange(len(tensor)) - first_chunk[tensor]) * NATIVE_CHUNK_NUMEL
    length = torch.clamp(sizes_tensor[tensor] - start, max=NATIVE_CHUNK_NUMEL)
    _last_chunk_table = (key, (tensor, start, length))
    return tensor, start, length


_last_chunk_table: tuple = (None, None)


def _mark_changed(tensors: list) -> None:
    """Bump the autograd version counters of tensors written behind torch's back (a backward that saved one of them
    then raises, as after any in-place op). One call for the list where torch takes one (torch >= 2.5 or so)."""
    global _increment_takes_lists
    if _increment_takes_lists:
        try:
            torch.autograd.graph.increment_version(tensors)
            return
        except TypeError:
            _increment_takes_lists = False
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)


_increment_takes_lists = True


def lion_update_native(params, grads, momenta, lr: float, beta1: float, beta2: float,
                       weight_decay: float) -> list[int]:
    """`lion_update_foreach` for float32 CPU tensors (`native_eligible`) in one call of a C kernel: one pass over
    each tensor, all tensors' chunks shared by torch's intra-op threads. The same bits as the other kernels (tested).

    Elements whose gradient is NaN or ±inf keep their parameter and momentum; the check costs no extra read.
    Returns the indices (into ``params``) of the tensors that had such elements; their other elements, and every
    other tensor, took the step. Raises RuntimeError if the kernel cannot be built here (`native_kernel_available`).
    """
    function = _native_function()
    if function is None:
        raise RuntimeError(f"Lion: the C kernel could not be built here ({native.failure(_NATIVE_KERNEL)})")
    if not params:
        return []
    sizes = tuple(p.numel() for p in params)
    for name, tensors in (("grads", grads), ("momenta", momenta)):
        # the kernel trusts these sizes: a momentum of another shape (e.g. from a foreign state dict) must not reach it
        if len(tensors) != len(sizes) or any(t.numel() != n for t, n in zip(tensors, sizes)):
            raise ValueError(f"lion_update_native: {name} must match params in number and size, got sizes "
                             f"{[t.numel() for t in tensors]} for {list(sizes)}")
    tensor, start, length = _chunk_table(sizes)
    pointers = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (params, grads, momenta)]
    nonfinite = torch.zeros(len(tensor), dtype=torch.uint8)
    # the scalars as eager torch rounds them: Python floats (doubles) rounded once to float32 by ctypes
    function(len(tensor), tensor.data_ptr(), start.data_ptr(), length.data_ptr(), *(p.data_ptr() for p in pointers),
             1 - lr * weight_decay, -lr, beta1, 1 - beta1, beta2, 1 - beta2, nonfinite.data_ptr(),
             torch.get_num_threads())
    _mark_changed(params + momenta)
    return sorted(set(tensor[nonfinite.bool()].tolist()))


def lion_reference_float64(param, grad, momentum, lr, beta1, beta2, weight_decay):
    """The paper's formula in float64, out of place: returns (new_param, new_momentum). For tests."""
    param, grad, momentum = (t.double() for t in (param, grad, momentum))
    direction = torch.sign(beta1 * momentum + (1 - beta1) * grad)
    new_param = param - lr * (direction + weight_decay * param)
    new_momentum = beta2 * momentum + (1 - beta2) * grad
    return new_param, new_momentum
