"""Catch host syncs in tests that run on the CPU.

On CUDA, whatever hands a tensor's value to Python (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``, a Python list indexed by a tensor) or gives an output whose size depends on the values
(``nonzero``, boolean-mask indexing, ``unique``) makes the host wait until the device has run everything queued
before it. On the CPU the same calls cost nothing, so a CPU-only suite never notices them; `HostSyncDetector` does:

* as a `TorchDispatchMode` it sees the aten operations: ``_local_scalar_dense`` (behind item/bool/int/float and
  tensor indices), ``equal`` and ``is_nonzero`` (they return a Python bool), the value-sized operations, and copies
  from another device to the CPU (which never happen in a CPU run, but do on a GPU);
* ``.tolist()``, ``.cpu()`` and ``.numpy()`` of a CPU tensor dispatch no operation at all, so while active it also
  wraps those three `torch.Tensor` methods.

Not seen: ``.to("cpu")`` of a CPU tensor (a no-op, indistinguishable from moving to the compute device when that is
the CPU) and blocking host-to-device copies (CPU to CPU here). `torch._assert_async` is not a sync and passes.

    with HostSyncDetector() as detector:       # raise_on_sync=True: fail at the first one, with where it happened
        scheduler.step(output, t, sample)
    detector.events                             # (what, where) pairs, when raise_on_sync=False
"""

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations that hand a value to the host.
READS = {
    aten._local_scalar_dense.default: "reads a value (.item(), bool(), int(), float(), or a tensor index)",
    aten.equal.default: "compares on the host (torch.equal)",
    aten.is_nonzero.default: "reads a truth value (is_nonzero)",
}
# Operations whose output size depends on the values: the host must learn it before allocating.
VALUE_SIZED = {aten.nonzero, aten.masked_select, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
               aten._unique, aten._unique2}
TENSOR_METHODS = ("tolist", "cpu", "numpy")
_THIS_FILE = str(Path(__file__).resolve())
_PLUMBING = (_THIS_FILE, "/torch/utils/_python_dispatch.py", "/torch/_tensor.py", "/torch/overrides.py",
             "/torch/_dynamo/", "/torch/_compile.py")


class HostSyncError(AssertionError):
    """A host sync where a test said there must be none."""


class HostSyncDetector(TorchDispatchMode):
    """Record (or, with ``raise_on_sync=True``, the default, refuse) every operation that would make the host wait
    for an accelerator. ``events``: (what, where) with where the innermost caller outside torch's plumbing."""

    def __init__(self, raise_on_sync: bool = True):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.events: list[tuple[str, str]] = []
        self._saved_methods: dict[str, object] = {}

    # ---- the aten operations --------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _sync_of(func, args, kwargs)
        if what is not None:
            self._record(f"{func}: {what}")
        return func(*args, **kwargs)

    # ---- the Tensor methods that dispatch nothing on the CPU ------------------------------------------------------
    def __enter__(self):
        for name in TENSOR_METHODS:
            self._saved_methods[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._watched(name, getattr(torch.Tensor, name)))
        try:
            return super().__enter__()
        except BaseException:
            self._restore_methods()
            raise

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._restore_methods()

    def _watched(self, name: str, method):
        def watched(tensor, *args, **kwargs):
            self._record(f"Tensor.{name}(): copies values to the host")
            return method(tensor, *args, **kwargs)

        return watched

    def _restore_methods(self):
        for name, saved in self._saved_methods.items():
            if saved is None:
                delattr(torch.Tensor, name)  # it was inherited from the C base class
            else:
                setattr(torch.Tensor, name, saved)
        self._saved_methods = {}

    # ---- reporting ------------------------------------------------------------------------------------------------
    def _record(self, what: str) -> None:
        where = _caller()
        self.events.append((what, where))
        if self.raise_on_sync:
            raise HostSyncError(f"host sync: {what}, at {where}")

    def events_in(self, path_part: str) -> list[tuple[str, str]]:
        """The events whose innermost caller's file path contains ``path_part`` (e.g. "hf_ext/")."""
        return [event for event in self.events if path_part in event[1]]


def _sync_of(func, args, kwargs) -> str | None:
    """Why ``func`` would make the host wait for the device, or None."""
    if func in READS:
        return READS[func]
    if func.overloadpacket in VALUE_SIZED:
        return "its output size depends on the values"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "its output size depends on the repeats (pass output_size)"
    if func is aten.index.Tensor and any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
                                         for index in args[1]):
        return "boolean-mask indexing sizes its output by the mask's values"
    if func is aten._to_copy.default:
        source, target = args[0].device, kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and source.type != "cpu":
            return f"copies from {source} to the host"
    if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return f"copies from {args[1].device} to the host"
    return None


def _caller() -> str:
    """file:line (function) of the innermost frame outside this module and torch's dispatch plumbing."""
    for frame in reversed(traceback.extract_stack()):
        if not any(part in frame.filename for part in _PLUMBING):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"
