"""ReRoPE and Leaky ReRoPE attention (Su Jianlin, kexue.fm posts 9708 and 9728), blockwise and exact.

RoPE makes the logit of query i and key j depend on the distance Δ = pos_i − pos_j. ReRoPE keeps Δ inside a window w
and caps it outside: the logit is computed as if the distance were

    ReRoPE(w):        Δ            if Δ < w,   else  w
    Leaky(w, k):      Δ            if Δ < w,   else  w + (Δ − w) / k

so no distance beyond what the model was trained on ever appears. Each logit is therefore one of two dot products:

    near (Δ < w):  (R_{pos_i} q_i) · (R_{pos_j} k_j)                       ordinary RoPE
    far  (Δ ≥ w):  (R_{far(pos_i)} q_i) · (R_{pos_j / k} k_j),  far(p) = (p − w)/k + w   (ReRoPE: k = ∞, R_0 k = k)

`rerope_attention` computes softmax over exactly those logits without ever holding an L×L matrix: it walks over
blocks of queries; for each block the keys split into a far-only prefix (one matmul with the far query) and a band of
at most `block + w − 1` keys where both products are needed and selected per element. Work is one causal QKᵀ plus a
band; memory is one block of scores, so peak memory grows linearly in the sequence length.

Shapes: B batch, H query heads, Hkv key/value heads (H % Hkv == 0), Lq queries, Lk keys, D head width.
Queries are the last Lq of the Lk keys (a KV cache holds the first Lk − Lq). Positions are per token and must count
tokens within each row (left or right padding is fine); padded keys carry position −1.
No transformers imports: this file travels with HfExt checkpoints (``trust_remote_code``).
"""

import torch

from .ops_hfext import rotate_half


def rotate_by(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, L, D] (rotate-half layout) by the (possibly fractional) ``positions`` [B, L].

    Angles are computed in float32 like transformers' rotary embeddings (float64 for float64 inputs); negative
    positions rotate backwards.
    """
    precision = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(precision)[..., None] * inv_freq.to(device=x.device, dtype=precision)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, D]
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def far_query_positions(positions: torch.Tensor, window: int, leaky_factor: float | None) -> torch.Tensor:
    """Position at which a query is rotated for its far logits: w (ReRoPE) or (p − w)/k + w (Leaky)."""
    if leaky_factor is None:
        return torch.full_like(positions, window, dtype=torch.float32)
    return (positions.to(torch.float32) - window) / leaky_factor + window


def far_key_positions(positions: torch.Tensor, leaky_factor: float | None) -> torch.Tensor:
    """Position at which a key is rotated for far logits: 0 (ReRoPE, the key stays un-rotated) or p/k (Leaky)."""
    if leaky_factor is None:
        return torch.zeros_like(positions, dtype=torch.float32)
    return positions.to(torch.float32) / leaky_factor


def key_positions_from_mask(
    padding_mask: torch.Tensor | None, batch_size: int, kv_length: int, kv_offset: int, device
) -> torch.Tensor:
    """Positions [B, kv_length] of the keys kv_offset … kv_offset+kv_length−1, −1 for padding.

    ``padding_mask`` is the 2D attention mask over every token seen so far ([B, ≥ kv_offset + kv_length], 1 = real).
    A real token's position is the number of real tokens before it in its row (what `generate` uses).
    """
    if padding_mask is None:
        positions = torch.arange(kv_offset, kv_offset + kv_length, device=device)
        return positions[None].expand(batch_size, -1)
    real = padding_mask.to(device=device, dtype=torch.bool)
    positions = real.long().cumsum(-1) - 1
    positions = positions.masked_fill(~real, -1)[:, kv_offset : kv_offset + kv_length]
    if positions.shape[-1] < kv_length:  # the 2D mask may not cover tokens just appended
        raise ValueError(f"attention_mask covers {real.shape[-1]} tokens, fewer than the {kv_offset + kv_length} attended")
    return positions


def _default_block_size(batch: int, heads: int, keys: int, budget_elements: int = 1 << 24) -> int:
    """Query rows per block so that one block of fp32 scores stays near `budget_elements` (64 MiB)."""
    rows = budget_elements // max(1, batch * heads * keys)
    return int(min(1024, max(16, rows)))


def rerope_attention(
    query_near: torch.Tensor,
    query_far: torch.Tensor,
    key_near_tail: torch.Tensor,
    key_far: torch.Tensor,
    value: torch.Tensor,
    key_positions: torch.Tensor,
    window: int,
    scaling: float,
    sliding_window: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Exact ReRoPE / Leaky ReRoPE attention over rotated inputs; returns [B, Lq, H, Dv].

    Args:
        query_near: [B, H, Lq, D], queries rotated at their positions (ordinary RoPE).
        query_far: [B, H, Lq, D], queries rotated at `far_query_positions`.
        key_near_tail: [B, Hkv, T, D], the last T = min(Lk, Lq + window − 1) keys rotated at their positions: the
            only keys that can be within the window of a query.
        key_far: [B, Hkv, Lk, D], every key rotated at `far_key_positions` (ReRoPE: un-rotated).
        value: [B, Hkv, Lk, Dv].
        key_positions: [B, Lk] integer positions, −1 for padded keys; the queries sit at the last Lq of them.
        window: w ≥ 1, the distances kept as they are.
        scaling: the softmax scale (usually head_dim ** −0.5).
        sliding_window: if set, keys at distance ≥ sliding_window are not attended (sliding-window layers).
        block_size: query rows per block; default keeps one block of scores near 64 MiB.
    """
    batch, heads, q_len, head_dim = query_near.shape
    kv_heads, k_len = key_far.shape[1], key_far.shape[2]
    groups = heads // kv_heads
    tail = key_near_tail.shape[2]
    if tail != min(k_len, q_len + window - 1):
        raise ValueError(f"key_near_tail must hold the last {min(k_len, q_len + window - 1)} keys, got {tail}")
    block = block_size or _default_block_size(batch, heads, k_len)
    out_dtype = value.dtype
    score_dtype = torch.promote_types(query_near.dtype, torch.float32)  # softmax in fp32 at least
    # [B, Hkv, G, Lq, D]: each key/value head serves G query heads without being repeated in memory.
    q_near = query_near.view(batch, kv_heads, groups, q_len, head_dim)
    q_far = query_far.view(batch, kv_heads, groups, q_len, head_dim)
    key_is_real = (key_positions >= 0)[:, None, None, None, :]  # [B, 1, 1, 1, Lk]
    first_query_key = k_len - q_len  # key index of query 0
    tail_start = k_len - tail
    outputs = []
    for start in range(0, q_len, block):
        stop = min(q_len, start + block)
        rows = stop - start
        last_key = first_query_key + stop  # keys [0, last_key) can be attended by this block
        far_only = max(0, first_query_key + start - window + 1)  # keys [0, far_only) are far for every row
        band = slice(far_only, last_key)

        def scores(q, keys):
            flat = q[:, :, :, start:stop].reshape(batch, kv_heads, groups * rows, head_dim)
            return (flat @ keys.transpose(-1, -2)).view(batch, kv_heads, groups, rows, -1)

        band_far = scores(q_far, key_far[:, :, band])
        band_near = scores(q_near, key_near_tail[:, :, far_only - tail_start : last_key - tail_start])
        query_index = torch.arange(first_query_key + start, first_query_key + stop, device=value.device)
        distance = query_index[:, None] - torch.arange(far_only, last_key, device=value.device)[None, :]
        band_scores = torch.where(distance < window, band_near, band_far)
        band_allowed = distance >= 0
        if sliding_window is not None:
            band_allowed = band_allowed & (distance < sliding_window)
        band_scores = band_scores.to(score_dtype).masked_fill(~band_allowed, float("-inf"))
        parts = [band_scores]
        if far_only > 0:
            far_scores = scores(q_far, key_far[:, :, :far_only]).to(score_dtype)
            if sliding_window is not None:
                far_distance = query_index[:, None] - torch.arange(far_only, device=value.device)[None, :]
                far_scores = far_scores.masked_fill(far_distance >= sliding_window, float("-inf"))
            parts.insert(0, far_scores)
        block_scores = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        block_scores = block_scores.mul_(scaling).masked_fill_(~key_is_real[..., :last_key], float("-inf"))
        probabilities = torch.softmax(block_scores, dim=-1)
        # Rows that see no key at all (padded queries) give NaN: make them 0 rather than poison later layers.
        probabilities = torch.nan_to_num(probabilities, nan=0.0).to(out_dtype)
        outputs.append(probabilities @ value[:, :, None, :last_key])  # [B, Hkv, G, rows, Dv]
    out = torch.cat(outputs, dim=3).view(batch, heads, q_len, -1)
    return out.transpose(1, 2).contiguous()
