"""MLA kernels (re-exported from the HfExt model files, where they travel with checkpoints)."""

from ..models.hfext.mla_hfext import (
    absorbed_attention_with_weights,
    mla_attention_absorbed,
    mla_attention_expanded,
    rotate_interleaved,
    yarn_softmax_scale,
)

__all__ = ["absorbed_attention_with_weights", "mla_attention_absorbed", "mla_attention_expanded",
           "rotate_interleaved", "yarn_softmax_scale"]
