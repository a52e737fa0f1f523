"""Math kernels: pure torch functions with their shapes in the docstrings (no transformers imports).

The kernels the HfExt model uses live beside its modeling file (they travel with checkpoints for
``trust_remote_code``); this package is their public home.
"""

from ..models.hfext.ops_hfext import apply_rotary, logn_query_scale, repeat_kv, rotate_half
from ..models.hfext.rerope_hfext import (
    attention_with_lse,
    far_key_positions,
    far_query_positions,
    key_positions_from_mask,
    rerope_attention,
    rerope_attention_blockwise,
    rotate_by,
)
from .lion import lion_reference_float64, lion_update_foreach, lion_update_fused, lion_update_single
from .tail_capped import fused_linear_tail_capped_loss, tail_capped_token_losses, tail_capped_weights

__all__ = [
    "apply_rotary", "logn_query_scale", "repeat_kv", "rotate_half", "attention_with_lse", "far_key_positions",
    "far_query_positions", "key_positions_from_mask", "rerope_attention", "rerope_attention_blockwise", "rotate_by",
    "lion_reference_float64", "lion_update_foreach", "lion_update_fused", "lion_update_single",
    "fused_linear_tail_capped_loss", "tail_capped_token_losses", "tail_capped_weights",
]
