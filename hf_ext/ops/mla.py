"""Multi-head latent attention (DeepSeek-V2 §2.1, kexue.fm post 10091): the expanded and the absorbed computation.

Per token the cache holds only the normalised KV latent ``c_kv`` [d_c] and the rotary key ``k_rope`` [g, d_r], where
g = 1 is DeepSeek's single rotary key shared by all heads and g > 1 gives one rotary key per group of heads. Head i's
key is [W_UK_i·c_kv ; k_rope of its group] and its value W_UV_i·c_kv. Two exact ways to attend:

* expanded (prefill, training): up-project the latents into per-head keys and values, then ordinary attention;
* absorbed (decoding): fold W_UK into the query (q_latent_i = W_UK_iᵀ·q_nope_i) and W_UV into the output, so that
  attention runs over the cached latents directly — an MQA with head dim d_c + d_r whose values are c_kv.

They are equal by associativity; the tests check it at every decode step. Shapes: batch b, heads h, query length s,
key length t. No transformers imports here. Not wired into the HfExt model family yet (issue 7 in progress).
"""

import torch


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
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    return torch.softmax(scores, dim=-1)


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
    _check_shapes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)
    q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)
    scores = (torch.einsum("bhsc,btc->bhst", q_latent, c_kv) + _rope_scores(q_rope, k_rope)) * scale
    latent_output = torch.einsum("bhst,btc->bhsc", _softmax(scores, mask).to(c_kv.dtype), c_kv)
    return torch.einsum("bhsc,hdc->bhsd", latent_output, w_uv)
