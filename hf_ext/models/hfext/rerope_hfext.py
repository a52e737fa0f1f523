"""ReRoPE and Leaky ReRoPE attention (Su Jianlin, kexue.fm posts 9708 and 9728), blockwise and exact.

RoPE makes the logit of query i and key j depend on the distance Δ = pos_i − pos_j. ReRoPE keeps Δ inside a window w
and caps it outside: the logit is computed as if the distance were

    ReRoPE(w):        Δ            if Δ < w,   else  w
    Leaky(w, k):      Δ            if Δ < w,   else  w + (Δ − w) / k

so no distance beyond what the model was trained on ever appears. Each logit is therefore one of two dot products:

    near (Δ < w):  (R_{pos_i} q_i) · (R_{pos_j} k_j)                       ordinary RoPE
    far  (Δ ≥ w):  (R_{far(pos_i)} q_i) · (R_{pos_j / k} k_j),  far(p) = (p − w)/k + w   (ReRoPE: k = ∞, R_0 k = k)

`rerope_attention` computes the softmax over exactly those logits without ever holding an L×L matrix. Its main
path splits them into disjoint key sets and merges partial results by their log-sum-exp: the far logits are (up to)
two fused causal attention passes of the far queries over the far keys (a causal mask shifted by w), the near ones a
fused pass per block of queries over a band of w + block keys. `rerope_attention_blockwise`, used for sliding-window
layers and when gradients are needed, walks over blocks of queries with explicit scores: a far-only key prefix and a
band where both products are computed and selected per element. Either way the work is about one causal QKᵀ plus a
band, and memory grows linearly in the sequence length.

Shapes: B batch, H query heads, Hkv key/value heads (H % Hkv == 0), Lq queries, Lk keys, D head width.
Queries are the last Lq of the Lk keys (a KV cache holds the first Lk − Lq). Positions are per token and must count
tokens within each row (left or right padding is fine); padded keys carry position −1.
No transformers imports: this file travels with HfExt checkpoints (``trust_remote_code``).
"""

import functools
import warnings

import torch

from .ops_hfext import rotate_half


def rotate_by(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, L, D] (rotate-half layout) by the (possibly fractional) ``positions`` [B, L].

    Angles are computed in float32 like transformers' rotary embeddings (float64 for float64 inputs); negative
    positions rotate backwards.
    """
    precision = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(precision)[..., None] * inv_freq.to(device=x.device, dtype=precision)  # [B, L, D/2]
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat((cos, cos), dim=-1)[:, None].to(x.dtype)  # [B, 1, L, D]
    sin = torch.cat((sin, sin), dim=-1)[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


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


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter; None for inference-mode tensors, which have none (identity alone counts)."""
    return None if tensor.is_inference() else tensor._version


def _once_per_forward(function):
    """Memoise `function(key_positions, *rest)` on the identity (and version) of its tensor arguments.

    Every layer of one forward receives the same key-position tensor, so a check that reads it back to the host
    (a GPU sync), or flex attention's block masks, are computed once per forward instead of once per layer. One
    entry is kept: the last forward's.
    """
    last = {}

    @functools.wraps(function)
    def memoised(*args):
        signature = tuple((id(a), _version_of(a)) if torch.is_tensor(a) else a for a in args)
        if last.get("signature") == signature and all(x is y for x, y in zip(last["args"], args)):
            return last["result"]
        result = function(*args)
        last.update(signature=signature, args=args, result=result)
        return result

    return memoised


@_once_per_forward
def check_query_positions(key_positions: torch.Tensor, position_ids: torch.Tensor | None, q_len: int) -> None:
    """Raise unless the model's position ids agree with the positions counted from the attention mask.

    ReRoPE recomputes positions from the mask (the cache does not store them); custom position ids (packed
    sequences, offsets) would make the two disagree silently.
    """
    if position_ids is None:
        return
    expected = key_positions[:, -q_len:]
    given = position_ids.expand_as(expected)
    real = expected >= 0
    if not torch.equal(given[real], expected[real]):
        raise ValueError(
            "ReRoPE attention needs position ids that count the tokens of each row from 0 (left or right padding "
            "is fine); the given position_ids differ (packed sequences or custom offsets are not supported)."
        )


def _default_block_size(batch: int, heads: int, keys: int, budget_elements: int = 1 << 24) -> int:
    """Query rows per block so that one block of fp32 scores stays near `budget_elements` (64 MiB)."""
    rows = budget_elements // max(1, batch * heads * keys)
    return int(min(1024, max(16, rows)))


def rerope_attention_blockwise(
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
    """Exact ReRoPE / Leaky ReRoPE attention with explicit score blocks (sliding windows, any device).

    Arguments and result as for `rerope_attention` (rows may be padded at their start and end only);
    `block_size` defaults to keeping one block of scores near 64 MiB.
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


# ---------------------------------------------------------------------------------------------------------------
# The fast path: fused attention passes merged by their log-sum-exp


def attention_with_lse(query, key, value, scale: float, is_causal: bool = False, mask=None):
    """softmax(q kᵀ · scale [+ mask]) v and its row log-sum-exp: ([B, H, Lq, Dv], float [B, H, Lq]).

    Key/value heads may be fewer than query heads (grouped-query attention). ``is_causal`` aligns the causal mask
    top-left (query r sees keys ≤ r). On CPU this is torch's fused flash kernel (a private op, wrapped only here);
    elsewhere, or when values are narrower than keys, an explicit computation.
    """
    groups = query.shape[1] // key.shape[1]
    if query.device.type == "cpu" and query.shape[-1] == value.shape[-1]:
        if groups > 1 and not _cpu_flash_reads_grouped_heads():
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale
        )
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)).to(torch.promote_types(query.dtype, torch.float32)) * scale
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(-1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return weights.to(value.dtype) @ value, lse


@functools.cache
def _cpu_flash_reads_grouped_heads() -> bool:
    """Whether torch's CPU flash kernel maps query head h to key/value head h // groups. Older releases (torch 2.6
    among them) read key head h instead, past the tensor's heads. The probe's single key head is a view into two
    heads of different values, so that misreading stays inside the probe's own memory and shows."""
    storage = torch.zeros(1, 2, 1, 8)
    storage[:, 1] = 1.0  # what a head-h read of query head 1 would find
    key_value = storage[:, :1]
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        torch.ones(1, 2, 1, 8), key_value, key_value, 0.0, False, scale=1.0)[0]
    return bool((out == 0).all())


def _merge_by_lse(parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention results (out [..., Dv], lse [...]) over disjoint key sets into the softmax over their
    union: out = Σ_p e^{lse_p} out_p / Σ_p e^{lse_p}, lse = log Σ_p e^{lse_p}, in float32 at least (float64 stays).
    Differentiable; rows that no key reaches (every lse −inf) give out 0 and lse −inf."""
    precision = torch.promote_types(parts[0][0].dtype, torch.float32)
    shift = torch.stack([lse for _, lse in parts]).amax(0).to(precision)
    # The result does not depend on the shift: detaching it is exact and keeps −inf out of the gradients.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
    total = weight_sum = 0
    for out, lse in parts:
        weight = torch.exp(lse.to(precision) - shift)
        total = total + out.to(precision) * weight[..., None]
        weight_sum = weight_sum + weight
    reached = weight_sum > 0
    divisor = torch.where(reached, weight_sum, torch.ones_like(weight_sum))  # no 0/0, nor log(0) in the gradients
    return total / divisor[..., None], torch.where(reached, shift + divisor.log(), torch.full_like(shift, -torch.inf))


class _SoftmaxAccumulator:
    """Merges partial attention results over disjoint key sets: o = Σ e^{l_p} o_p / Σ e^{l_p}."""

    def __init__(self, batch, heads, q_len, v_dim, dtype, device):
        precision = torch.promote_types(dtype, torch.float32)
        self.out = torch.zeros(batch, heads, q_len, v_dim, dtype=precision, device=device)
        self.lse = torch.full((batch, heads, q_len), float("-inf"), dtype=precision, device=device)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        self.out[:, :, rows], self.lse[:, :, rows] = _merge_by_lse(
            [(self.out[:, :, rows], self.lse[:, :, rows]), (out, lse)])


def _rerope_prefix_padded(query_near, query_far, key_near_tail, key_far, value, pad, window, scaling, block_size):
    """Fast path for rows sharing `pad` leading padded keys (and possibly trailing ones). Returns [B, H, Lq, Dv]."""
    batch, heads, q_len, _ = query_near.shape
    k_len = key_far.shape[2]
    first = k_len - q_len  # key index of query 0
    acc = _SoftmaxAccumulator(batch, heads, q_len, value.shape[-1], value.dtype, value.device)

    # Far logits: query r may use keys pad … first + r − window. Let c = first − window − pad.
    far_end = k_len - window  # no query reaches key far_end or beyond with a far logit
    if far_end > pad:
        c = first - window - pad
        if c >= 0:
            # keys pad … pad + c are far for every query; the next q_len − 1 keys follow a strict causal staircase
            acc.add(slice(0, q_len), *attention_with_lse(
                query_far, key_far[:, :, pad : pad + c + 1], value[:, :, pad : pad + c + 1], scaling))
            if q_len > 1:
                acc.add(slice(1, q_len), *attention_with_lse(
                    query_far[:, :, 1:], key_far[:, :, pad + c + 1 : far_end], value[:, :, pad + c + 1 : far_end],
                    scaling, is_causal=True))
        else:
            # queries before row −c have no far key; the others see a causal staircase of keys from `pad` on
            acc.add(slice(-c, q_len), *attention_with_lse(
                query_far[:, :, -c:], key_far[:, :, pad:far_end], value[:, :, pad:far_end], scaling, is_causal=True))

    # Near logits: query r uses keys max(pad, first + r − window + 1) … first + r, in blocks of queries.
    tail_start = k_len - key_near_tail.shape[2]
    first_real_row = max(0, pad - first)
    block = block_size or 256  # measured: smaller bands waste less of the masked work, larger ones cost more calls
    band_masks = {}  # every full block away from the start has the same band: build it once
    for start in range(first_real_row, q_len, block):
        stop = min(q_len, start + block)
        key_start = max(pad, first + start - window + 1)
        key_stop = first + stop
        shape = (stop - start, key_stop - key_start, first + start - key_start)
        if shape not in band_masks:
            rows, keys, offset = shape
            distance = torch.arange(rows, device=value.device)[:, None] + offset - torch.arange(keys, device=value.device)
            allowed = (distance >= 0) & (distance < window)
            band_masks[shape] = torch.zeros(allowed.shape, dtype=query_near.dtype, device=value.device).masked_fill(
                ~allowed, float("-inf"))
        acc.add(slice(start, stop), *attention_with_lse(
            query_near[:, :, start:stop], key_near_tail[:, :, key_start - tail_start : key_stop - tail_start],
            value[:, :, key_start:key_stop], scaling, mask=band_masks[shape]))
    return acc.out.to(value.dtype)


def _edge_padding(key_positions: torch.Tensor) -> torch.Tensor:
    """`_leading_padding`, or a ValueError where padding sits between real tokens (no kernel supports that)."""
    pad = _leading_padding(key_positions)
    if pad is None:
        raise ValueError(
            "ReRoPE attention supports padding at the start or the end of a row only (positions 0, 1, 2, … in "
            "between); this attention mask has padding between real tokens."
        )
    return pad


@_once_per_forward
def _leading_padding(key_positions: torch.Tensor) -> torch.Tensor | None:
    """Per row, the number of leading padded keys, if every row is [padding] + p, p+1, p+2, … + [padding]; else None."""
    real = key_positions >= 0
    pad = real.long().argmax(-1)
    index = torch.arange(key_positions.shape[-1], device=key_positions.device)
    first_position = key_positions.gather(-1, pad[:, None])
    expected = index[None, :] - pad[:, None] + first_position
    return pad if bool(torch.where(real, key_positions == expected, True).all()) else None


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
        block_size: query rows per block.

    Rows may be padded at their start and end (what tokenizers and `generate` produce), not in between: distances
    are counted in tokens. The far logits are two fused causal attention passes over (far query, far key), the near
    ones a fused pass per block of queries over a band of keys, merged by log-sum-exp; nothing quadratic in L is
    built. On the CPU, sliding-window layers and training (gradients) use `rerope_attention_blockwise`. On other
    devices (CUDA) a prefill runs `rerope_attention_flex`, two compiled flex-attention passes that also train, and a
    decode step (or any call where flex attention is missing) the blockwise kernel (see `rerope_kernel_for`).
    """
    pad = _edge_padding(key_positions)
    if rerope_kernel_for(query_near.device, query_near.shape[2]) == "flex":
        try:
            return rerope_attention_flex(query_near, query_far, key_near_tail, key_far, value, key_positions, window,
                                         scaling, sliding_window=sliding_window)
        except ValueError:
            raise  # the inputs' fault (padding between tokens): the other kernels refuse them too
        except Exception as error:  # noqa: BLE001 - a compile or kernel failure: fall back, loudly, once
            _give_up_flex(error)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query_near, key_far, value))
    if sliding_window is not None or needs_grad or query_near.device.type != "cpu":
        # The fused CPU passes propagate no gradients through the merge; off the CPU, without flex attention, the
        # blockwise kernel is the one whose memory stays linear in L.
        return rerope_attention_blockwise(query_near, query_far, key_near_tail, key_far, value, key_positions,
                                          window, scaling, sliding_window=sliding_window, block_size=block_size)
    outputs = torch.empty(query_near.shape[:3] + (value.shape[-1],), dtype=value.dtype, device=value.device)
    for amount in pad.unique().tolist():
        rows = (pad == amount).nonzero().flatten()
        if rows.numel() == pad.numel():
            rows = slice(None)  # the whole batch shares one layout: no gather
        outputs[rows] = _rerope_prefix_padded(query_near[rows], query_far[rows], key_near_tail[rows], key_far[rows],
                                              value[rows], amount, window, scaling, block_size)
    return outputs.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Off the CPU: two flex-attention passes with block masks

FLEX_MIN_QUERIES = 64  # shorter calls (decode steps) build few scores: the blockwise kernel is cheaper than masks


flex_failure: str | None = None  # why flex attention failed in this process, once it has (then: blockwise)


def rerope_kernel_for(device: torch.device, q_len: int) -> str:
    """The kernel `rerope_attention` runs: "cpu" (torch's fused CPU passes), "flex" (`rerope_attention_flex`, on
    CUDA and other compiled devices) or "blockwise" (short calls, torch without flex attention, or after flex
    attention failed here: see `flex_failure`)."""
    if device.type == "cpu":
        return "cpu"
    if q_len >= FLEX_MIN_QUERIES and _flex_module() is not None and flex_failure is None:
        return "flex"
    return "blockwise"


def _give_up_flex(error: Exception) -> None:
    """Record why flex attention failed (a compile error, an unsupported GPU) and warn once; from then on this
    process takes the blockwise kernel: the same numbers, more time."""
    global flex_failure
    flex_failure = f"{type(error).__name__}: {error}"
    warnings.warn(f"ReRoPE attention: flex attention failed ({flex_failure}); using the blockwise kernel from now on "
                  "(same results, slower). Please report this with your torch version and GPU.", RuntimeWarning,
                  stacklevel=3)


@functools.cache
def _flex_module():
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention


@functools.cache
def _compiled_flex_attention():
    # Uncompiled, flex attention builds every score; compiled (Triton on CUDA) it skips masked blocks entirely.
    return torch.compile(_flex_module().flex_attention)


def _flex_with_lse(attend, query, key, value, block_mask, scale):
    """flex attention returning (out, natural-log LSE in float32); `return_aux` replaced `return_lse` in torch 2.9."""
    flex = _flex_module()
    grouped = query.shape[1] != key.shape[1]  # query heads share key/value heads without copies
    if hasattr(flex, "AuxRequest"):
        out, aux = attend(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=grouped,
                          return_aux=flex.AuxRequest(lse=True))
        return out, aux.lse
    return attend(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=grouped, return_lse=True)




@_once_per_forward  # every layer of one forward gets the same key positions, hence the same masks
def _rerope_block_masks(key_positions, q_len, tail, window, sliding_window, compiled):
    """(far, near) flex block masks; far may be None when no key is `window` or more tokens before a query."""
    batch, k_len = key_positions.shape
    first, tail_start = k_len - q_len, k_len - tail
    key_is_real = key_positions >= 0

    def reachable(b, q, key_index):
        distance = first + q - key_index
        allowed = key_is_real[b, key_index] & (distance >= 0)
        if sliding_window is not None:
            allowed = allowed & (distance < sliding_window)
        return allowed, distance

    def far_mask(b, h, q, kv):
        allowed, distance = reachable(b, q, kv)
        return allowed & (distance >= window)

    def near_mask(b, h, q, kv):  # kv indexes the tail of the keys
        allowed, distance = reachable(b, q, kv + tail_start)
        return allowed & (distance < window)

    create = _flex_module().create_block_mask
    device = key_positions.device
    far = None
    if k_len - 1 >= window:
        far = create(far_mask, batch, None, q_len, k_len, device=device, _compile=compiled)
    near = create(near_mask, batch, None, q_len, tail, device=device, _compile=compiled)
    return far, near


def rerope_attention_flex(
    query_near: torch.Tensor,
    query_far: torch.Tensor,
    key_near_tail: torch.Tensor,
    key_far: torch.Tensor,
    value: torch.Tensor,
    key_positions: torch.Tensor,
    window: int,
    scaling: float,
    sliding_window: int | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Exact ReRoPE / Leaky ReRoPE attention as two flex-attention passes; arguments and result as for
    `rerope_attention` (returns [B, Lq, H, Dv]).

    The far logits are one pass of the far queries over every key with the mask "distance ≥ window", the near ones
    one pass of the near queries over the key tail with "0 ≤ distance < window"; both masks also drop padded keys
    and keys beyond `sliding_window`. The two results are merged by their log-sum-exp, differentiably, so the same
    code trains. Compiled (`compiled=None`: everywhere but the CPU) the kernels skip fully masked blocks, so time
    follows one causal attention plus a band and memory grows linearly in L; uncompiled (what the CPU tests run)
    it computes the same numbers with every score built.
    """
    if _flex_module() is None:
        raise RuntimeError("rerope_attention_flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
    _edge_padding(key_positions)
    compiled = query_near.device.type != "cpu" if compiled is None else compiled
    q_len, k_len, tail = query_near.shape[2], key_far.shape[2], key_near_tail.shape[2]
    far_mask, near_mask = _rerope_block_masks(key_positions, q_len, tail, window, sliding_window, compiled)
    attend = _compiled_flex_attention() if compiled else _flex_module().flex_attention
    parts = [_flex_with_lse(attend, query_near, key_near_tail, value[:, :, k_len - tail:], near_mask, scaling)]
    if far_mask is not None:
        parts.append(_flex_with_lse(attend, query_far, key_far, value, far_mask, scaling))
    return _merge_by_lse(parts)[0].to(value.dtype).transpose(1, 2).contiguous()
