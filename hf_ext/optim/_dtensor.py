"""`is_dtensor`: whether a tensor is a `torch.distributed.tensor.DTensor` (FSDP2 shards parameters into them)."""

import sys

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    # No DTensor can exist before its module is imported, so an unimported module answers False without importing
    # it; this also covers torch builds without distributed support.
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)
