"""Pure-torch math of the HfExt decoder: rotary application, log-n query scaling, key/value head repetition.

No transformers imports: these functions are what the float64 reference tests hit first, and they travel with the
checkpoint when ``save_pretrained`` copies the model code for ``trust_remote_code``. ``hf_ext.ops`` re-exports them.
"""

import math

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by 90 degrees: the "rotate-half" rotary layout of Llama/GPT-NeoX."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [batch, heads, seq, head_dim] by the angles whose cos/sin are [batch, seq, head_dim]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def logn_query_scale(
    position_ids: torch.Tensor,
    training_length: int,
    clip_min: float | None = 1.0,
    window: int | None = None,
) -> torch.Tensor:
    """Entropy-invariant query factor ``max(clip_min, log(n) / log(training_length))``.

    ``n`` is the number of keys the query at absolute position ``p`` sees: ``p + 1`` under full causal attention,
    ``min(p + 1, window)`` in a sliding-window layer. Returns float64 factors shaped like ``position_ids``
    ([batch, seq]); multiply them into the queries as ``q * factor[:, None, :, None]``.
    """
    visible = position_ids.to(torch.float64) + 1.0  # cheap ([batch, seq]) and exact enough for float64 models
    if window is not None:
        visible = visible.clamp(max=float(window))
    factor = torch.log(visible.clamp(min=1.0)) / math.log(training_length)
    if clip_min is not None:
        factor = factor.clamp(min=clip_min)
    return factor


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * n_rep, seq, dim], each key/value head shared by n_rep queries."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq, dim = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq, dim)


def zero_rows_without_visible_keys(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention weights of query rows whose mask hides every key set to 0 (their output is 0, as with sdpa).

    An additive mask fills hidden entries with the dtype's minimum, not −inf, so such a row (a padded query whose
    sliding window holds only padding) would otherwise average over *all* keys of the forward, later tokens included:
    its logits would depend on how many tokens the forward holds, and assisted decoding, which verifies several
    tokens in one forward, would disagree with token-by-token greedy search."""
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    return weights.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)
