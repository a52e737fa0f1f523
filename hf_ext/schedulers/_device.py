"""Keeping the schedulers' per-step work on the sample's device, with the host never waiting for it.

Reading a device tensor's value on the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, finding it with
``nonzero``) makes the host wait until the device has run everything queued before it: once per step, that stalls
sampling and training. A pipeline hands `step()` the elements of ``scheduler.timesteps`` (on its device), so the
schedulers keep the schedule's values on the host as well and recognise those elements by their place in memory.
"""

import torch


def element_value(timestep, timesteps: torch.Tensor, values: list):
    """The value of ``timestep`` if it is one of the elements of ``timesteps`` (what iterating over or indexing
    ``scheduler.timesteps`` gives), taken from ``values`` (``timesteps`` as Python numbers, kept when the schedule
    was set); None for anything else. Only the tensors' metadata is read, never the device's memory."""
    if not isinstance(timestep, torch.Tensor) or timestep.numel() != 1 or timesteps.dim() != 1:
        return None
    if timestep.device != timesteps.device or timestep.dtype != timesteps.dtype or timesteps.stride(0) < 1:
        return None
    if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None  # another tensor (a copy, or a value computed from an element)
    index, misaligned = divmod(timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0))
    if misaligned or not 0 <= index < len(values):
        return None
    return values[index]


def queues_checks(device: torch.device) -> bool:
    """Whether checks of tensor values on ``device`` are queued there (`torch._assert_async`) instead of read."""
    return device.type == "cuda"


def refuse_if(problem: torch.Tensor, describe) -> None:
    """Raise ValueError(describe()) if the one-element bool tensor ``problem`` is True.

    On the CPU (and devices without asynchronous assertions) the flag is read: that costs nothing there. On CUDA
    the check is queued on the device, so that validating every training step's timesteps does not stall it: bad
    values then fail at the next synchronisation with a device-side assertion, as an out-of-range index does in
    diffusers' own ``add_noise``; the same call on the CPU gives the ValueError that names them.
    """
    if queues_checks(problem.device):
        torch._assert_async(~problem, "hf_ext scheduler: a timestep is out of range; run the same call on the CPU "
                                      "for a ValueError that names it")
    elif problem:
        raise ValueError(describe())
