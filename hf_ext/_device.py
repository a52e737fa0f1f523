"""Moving tensors to the device they are used on without making the host wait for it."""

import torch


def to_device(value, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` (a number, a list or a tensor) as a tensor on ``device``. From the host to an accelerator the copy
    does not make the host wait for the device (a blocking copy synchronises its stream); to the CPU it must block,
    or the values could be read before they land."""
    tensor = torch.as_tensor(value)
    return tensor.to(device=device, dtype=dtype, non_blocking=torch.device(device).type != "cpu")
