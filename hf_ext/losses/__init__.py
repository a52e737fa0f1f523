"""Training losses: the tail-capped (TaiLr) cross-entropy, plain and fused with the output projection."""

from .fused_lm_head import disable_fused_loss, enable_fused_loss
from .tail_capped import TailCappedLoss

__all__ = ["TailCappedLoss", "enable_fused_loss", "disable_fused_loss"]
