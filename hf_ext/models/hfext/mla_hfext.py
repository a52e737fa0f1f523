"""Multi-head latent attention (DeepSeek-V2 §2.1, kexue.fm post 10091): the kernels and the HfExt attention layer.

Per token an MLA layer caches only the key/value latent ``c_kv`` [d_c] and the rotary key ``k_rope`` [g, d_r], where
g = 1 is DeepSeek's single rotary key shared by all heads and g > 1 gives one rotary key per group of heads. Head i's
key is [W_UK_i·c_kv ; k_rope of its group] and its value W_UV_i·c_kv. Two exact ways to attend:

* expanded (training, prefill): up-project the latents into per-head keys and values, then ordinary attention;
* absorbed (decoding): fold W_UK into the query (q_latent_i = W_UK_iᵀ·q_nope_i) and W_UV into the output, so that
  attention runs over the cached latents directly — an MQA with head dim d_c + d_r whose values are c_kv.

They are equal by associativity (the tests check it at every decode step). The absorbed form reads the cache once per
step; the expanded form multiplies the whole cache by W_UK and W_UV at every step, which is what transformers'
`DeepseekV3Attention` does. Shapes: batch b, heads h, query length s, key length t.

This file is copied next to the weights by ``save_pretrained``: it imports only torch and ops_hfext.py. The attention
layer built on these kernels is `HfExtMLAttention` in modeling_hfext.py.
"""

import math

import torch
from torch import nn

from .ops_hfext import zero_rows_without_visible_keys


def _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv) -> int:
    heads, groups = q_nope.shape[1], k_rope.shape[1]
    if heads % groups:
        raise ValueError(f"the number of heads ({heads}) must be a multiple of the rotary key groups ({groups})")
    if w_uk.shape[:2] != (heads, q_nope.shape[-1]) or w_uk.shape[2] != c_kv.shape[-1]:
        raise ValueError(f"w_uk must be [heads={heads}, qk_nope_head_dim={q_nope.shape[-1]}, "
                         f"kv_lora_rank={c_kv.shape[-1]}], got {tuple(w_uk.shape)}")
    if w_uv.shape[0] != heads or w_uv.shape[2] != c_kv.shape[-1]:
        raise ValueError(f"w_uv must be [heads={heads}, v_head_dim, kv_lora_rank={c_kv.shape[-1]}], got "
                         f"{tuple(w_uv.shape)}")
    return heads // groups


def _rope_scores(q_rope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """q_rope [b, h, s, r] · k_rope [b, g, t, r] of each head's group -> [b, h, s, t], without repeating keys."""
    b, h, s, r = q_rope.shape
    groups = k_rope.shape[1]
    grouped = q_rope.reshape(b, groups, h // groups, s, r)
    return torch.einsum("bgqsr,bgtr->bgqst", grouped, k_rope).reshape(b, h, s, -1)


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys in float32 (float64 stays float64). ``mask``: additive float, or boolean (True = attend);
    a boolean mask fills with the dtype's minimum rather than -inf (no NaN), and rows it hides entirely get zero
    weights (`zero_rows_without_visible_keys`)."""
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask.to(scores.dtype)
    return zero_rows_without_visible_keys(torch.softmax(scores, dim=-1), mask)


def mla_attention_expanded(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale: float, mask=None) -> torch.Tensor:
    """Attention with per-head keys [W_UK_i c_kv ; k_rope] and values W_UV_i c_kv.

    q_nope [b, h, s, d_nope], q_rope [b, h, s, d_r] (rotated), c_kv [b, t, d_c], k_rope [b, g, t, d_r] (rotated),
    w_uk [h, d_nope, d_c], w_uv [h, d_v, d_c]; mask: additive, broadcastable to [b, h, s, t]. Returns [b, h, s, d_v].
    Softmax in float32 (or float64 for float64 inputs).
    """
    _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    k_nope = torch.einsum("btc,hdc->bhtd", c_kv, w_uk)
    values = torch.einsum("btc,hdc->bhtd", c_kv, w_uv)
    scores = (q_nope @ k_nope.transpose(-1, -2) + _rope_scores(q_rope, k_rope)) * scale
    return (_softmax(scores, mask).to(values.dtype) @ values)


def mla_attention_absorbed(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale: float, mask=None) -> torch.Tensor:
    """The same attention computed on the latents: W_UK folded into the query, W_UV applied after the average.

    Same arguments and result as `mla_attention_expanded`; the per-head keys and values are never formed.
    """
    return absorbed_attention_with_weights(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale, mask)[0]


def absorbed_attention_with_weights(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, scale: float, mask=None,
                                    dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`mla_attention_absorbed` that also returns the attention probabilities [b, h, s, t] (after dropout)."""
    _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    # Einsum folds (h, s) into one matrix dimension, so the cache is read once per step and never copied per head.
    q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)
    scores = (torch.einsum("bhsc,btc->bhst", q_latent, c_kv) + _rope_scores(q_rope, k_rope)) * scale
    weights = _softmax(scores, mask).to(c_kv.dtype)
    if dropout:
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    latent_output = torch.einsum("bhst,btc->bhsc", weights, c_kv)
    return torch.einsum("bhsc,hdc->bhsd", latent_output, w_uv), weights


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary for interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek checkpoints); the result is in rotate-half
    layout, which does not matter as queries and keys are rotated alike. cos/sin: [b, s, d] as for `apply_rotary`."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def kept_rotary_columns(head_dim: int, rope_dim: int) -> torch.Tensor:
    """The dims of a rotate-half head (and columns of its cat(angles, angles) tables) that MLA keeps rotary: the
    first rope_dim / 2 frequencies, i.e. pairs (i, i + head_dim/2) for i < rope_dim / 2. `HfExtMLAttention` reads its
    tables through them and `hf_ext.convert.to_mla` moves these rows of a GQA head into the rotary part."""
    half, keep = head_dim // 2, rope_dim // 2
    return torch.cat([torch.arange(keep), torch.arange(half, half + keep)])


def yarn_softmax_scale(rope_parameters: dict, qk_head_dim: int) -> float:
    """DeepSeek's softmax scale: qk_head_dim^-0.5, times mscale² when YaRN-style parameters carry `mscale_all_dim`."""
    scale = qk_head_dim**-0.5
    mscale_all_dim = rope_parameters.get("mscale_all_dim", 0) if rope_parameters.get("rope_type") != "default" else 0
    factor = rope_parameters.get("factor", 1.0)
    if mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def causal_bool_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[1, 1, q_len, kv_len], True where query i may attend key j: j <= i, which is how torch's
    `scaled_dot_product_attention(is_causal=True)` reads a missing mask. transformers leaves the mask out for sdpa only
    where that reading is right (query and key lengths equal, or a static cache being filled from position 0)."""
    return (torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None])[None, None]
