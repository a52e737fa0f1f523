"""The HfExt decoder: a Llama-style model whose attention is configurable per layer.

One forward pass reads top to bottom: embeddings -> rotary table -> per-layer masks -> decoder layers
(RMSNorm, attention, RMSNorm, SwiGLU) -> final norm -> LM head. Per layer, the config chooses

* the attention span (`layer_types`: full, or sliding window with its own cache layer),
* the position encoding (`position_encodings`: RoPE or none),
* log-n query scaling (`logn_scaling`),
* the attention mechanism (`attention_types`: grouped-query attention, or multi-head latent attention whose cache
  holds a low-rank latent; see mla_hfext.py).

With the default config it computes exactly what `LlamaForCausalLM` computes, with the same parameter names.

This file is copied next to the weights by ``save_pretrained`` and must stay loadable with ``trust_remote_code=True``
where hf_ext is not installed: it imports only torch, transformers and its sibling files.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_masks_for_generate, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_hfext import HfExtConfig
from .mla_hfext import (
    absorbed_attention_with_weights,
    causal_bool_mask,
    kept_rotary_columns,
    rotate_interleaved,
    yarn_softmax_scale,
)
from .ops_hfext import apply_rotary, logn_query_scale, repeat_kv, zero_rows_without_visible_keys
from .positions_hfext import (
    LAYOUT_FREQUENCY_ASSIGNMENT,
    build_position_ids,
    check_image_markers,
    multi_axis_angles,
)
from .rerope_hfext import (
    check_query_positions,
    far_key_positions,
    far_query_positions,
    key_positions_from_mask,
    rerope_attention,
    rotate_by,
)

try:  # transformers >= 5.23 (also takes 2-D position tensors and boolean masks)
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # older 5.x: what their Llama does inline

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, positions, :]


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`. HfExt models accept
# either name and hand the cache on (to masks, checkpointed layers, outputs) under the installed release's name.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def either_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once, as `cache` or as `past_key_values` (its name before transformers 5.24).")
    return cache if cache is not None else past_key_values


class HfExtRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HfExtRotaryEmbedding(nn.Module):
    """cos/sin tables of the model's rotary encoding; honours every `rope_type` of `ROPE_INIT_FUNCTIONS`.

    The name ends in ``RotaryEmbedding`` and the module keeps ``original_inv_freq`` so that transformers recomputes
    the (non-persistent) frequency buffers after meta-device loading.
    """

    def __init__(self, config: HfExtConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HfExtConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """inv_freq_i = theta^(-2i/head_dim), the original RoPE frequencies."""
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [batch, seq, head_dim] for positions [batch, seq], or [axes, batch, seq] (multimodal layouts:
        frequency f follows one axis, chosen by the config's `position_layout`)."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        if position_ids.dim() == 3:
            assignment = LAYOUT_FREQUENCY_ASSIGNMENT[self.config.position_layout]
            freqs = multi_axis_angles(position_ids, inv_freq, assignment, self.config.mrope_section)
        else:
            freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class HfExtPatchEmbedding(nn.Module):
    """Image patches to the hidden size: one linear map of a flattened patch (channels × patch × patch values, as the
    processor lays them out), i.e. a convolution whose kernel and stride are the patch size."""

    def __init__(self, config: HfExtConfig):
        super().__init__()
        self.proj = nn.Linear(config.image_channels * config.image_patch_size**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class HfExtMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: HfExtConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling + mask) v, softmax in fp32 or wider; returns [batch, seq, heads, dim] and the weights."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)  # fp32 for half precision, fp64 stays fp64
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    if attention_mask is not None:
        attn_weights = zero_rows_without_visible_keys(attn_weights, attention_mask)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def scale_queries_logn(queries: torch.Tensor, attention: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """Queries [b, h, s, d] times the layer's log-n factor when its `logn_scaling` is on (read from the config at call
    time). A per-query scalar commutes with the rotation and the projections, and leaves the cache untouched."""
    if not attention.uses_logn:
        return queries
    config = attention.config
    factor = logn_query_scale(position_ids, config.logn_training_length, config.logn_clip_min, attention.sliding_window)
    return queries * factor[:, None, :, None].to(queries.dtype)


class HfExtAttentionBase(nn.Module):
    """Common base of both attention kinds. `output_attentions` records the weights of this one class: older
    transformers 5.x releases read a two-class list in `_can_record_outputs["attentions"]` as (self, cross) attentions.

    Layer contract with hf_ext/attention.py, whose `hfx_rerope`, `hfx_leaky_rerope` and `hfx_logn` attention
    functions receive this module as `module` (they serve stock transformers layers too, which have neither attribute):

    * `uses_rope` (bool, set in `__init__` from `config.position_encodings[layer_idx]`): whether the layer rotates
      its queries and keys. False (a NoPE layer): the ReRoPE functions rotate nothing back and treat every logit as
      a near one. A module without it is taken as a RoPE layer.
    * `uses_logn` (the property below): whether the layer scales its queries by the log-n factor itself, before the
      attention function runs (`scale_queries_logn`). The functions test its presence, not its value: a module that
      has it owns log-n scaling, so they never scale its queries a second time; a module without it gets the factor
      from the function (`hfx_logn` always; the ReRoPE ones when the config's `logn_scaling` is on).
    """

    uses_rope: bool  # set by each subclass's __init__

    @property
    def uses_logn(self) -> bool:
        """Log-n query scaling of this layer, `config.logn_scaling[layer_idx]`, read at call time (like
        `rerope_mode`, so changing the config takes effect at once)."""
        return self.config.logn_scaling[self.layer_idx]


class HfExtAttention(HfExtAttentionBase):
    """Grouped-query attention whose span, position encoding and query scaling come from the config of its layer."""

    def __init__(self, config: HfExtConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.uses_rope = config.position_encodings[layer_idx] == "rope"

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias
        )
        if config.qk_norm:
            self.q_norm = HfExtRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = HfExtRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def uses_rerope(self) -> bool:
        """Whether this layer applies the config's `rerope_mode` (read at call time, so the switch is immediate)."""
        config = self.config
        return (
            config.rerope_mode != "off"
            and self.uses_rope
            and (self.sliding_window is None or self.sliding_window > config.rerope_window)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values: Cache | None = None,
        rerope_inputs: dict | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        query_states = scale_queries_logn(query_states, self, position_ids)
        if rerope_inputs is not None and self.uses_rerope():
            attn_output = self._rerope(query_states, key_states, value_states, position_ids, past_key_values,
                                       **rerope_inputs[self.layer_type])
            return self.o_proj(attn_output.reshape(*input_shape, -1)), None
        if self.uses_rope:
            cos, sin = position_embeddings
            query_states = apply_rotary(query_states, cos, sin)
            key_states = apply_rotary(key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _rerope(self, query, key, value, position_ids, past_key_values, key_positions, inv_freq, attention_scaling):
        """ReRoPE / Leaky ReRoPE attention; the cache holds keys rotated for the far logits, so a decode step
        rotates only the `rerope_window` most recent keys, never the whole cache."""
        config = self.config
        window = config.rerope_window
        leaky_factor = config.rerope_leaky_factor if config.rerope_mode == "leaky_rerope" else None
        q_len = query.shape[2]
        check_query_positions(key_positions, position_ids, q_len)
        if attention_scaling != 1.0:  # yarn-style tables scale cos and sin, i.e. queries and keys
            query, key = query * attention_scaling, key * attention_scaling
        query_positions = key_positions[:, -q_len:].clamp(min=0)
        # ReRoPE caches raw keys; Leaky caches keys rotated at p/k.
        key_far = key if leaky_factor is None else rotate_by(key, far_key_positions(query_positions, leaky_factor),
                                                             inv_freq)
        if past_key_values is not None:
            key_far, value = past_key_values.update(key_far, value, self.layer_idx)
            # A static cache returns its whole buffer; the keys so far are its first `len(key_positions)` slots.
            key_far, value = key_far[:, :, :key_positions.shape[1]], value[:, :, :key_positions.shape[1]]
        tail = min(key_far.shape[2], q_len + window - 1)
        tail_positions = key_positions[:, -tail:].clamp(min=0)
        tail_shift = tail_positions if leaky_factor is None else tail_positions - far_key_positions(tail_positions,
                                                                                                    leaky_factor)
        key_near_tail = rotate_by(key_far[:, :, -tail:], tail_shift, inv_freq)
        query_near = rotate_by(query, query_positions, inv_freq)
        query_far = rotate_by(query, far_query_positions(query_positions, window, leaky_factor), inv_freq)
        return rerope_attention(query_near, query_far, key_near_tail, key_far, value, key_positions, window,
                                self.scaling, sliding_window=self.sliding_window)


class HfExtMLAttention(HfExtAttentionBase):
    """Multi-head latent attention with DeepSeek-V2/V3 parameter names (so DeepSeek weights load as they are):
    `q_proj` or `q_a_proj → q_a_layernorm → q_b_proj`; `kv_a_proj_with_mqa` → [latent | rotary keys];
    `kv_a_layernorm` on the latent; `kv_b_proj` (W_UK and W_UV stacked per head); `o_proj`.

    The cache layer holds the latent as "keys" [b, 1, t, d_c] and the rotary keys as "values" [b, 1, t, g·d_r].
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        self.uses_rope = config.position_encodings[layer_idx] == "rope"
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_key_heads = config.mla_rope_key_heads
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.num_key_value_groups = 1  # the attention interface gets per-head keys and values
        self.scaling = yarn_softmax_scale(config.rope_parameters or {}, self.qk_head_dim)
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads = config.hidden_size, self.num_heads

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=config.attention_bias)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = HfExtRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, self.kv_lora_rank + self.rope_key_heads * self.qk_rope_head_dim, bias=config.attention_bias
        )
        if config.kv_latent_norm:
            eps = config.rms_norm_eps if config.kv_latent_norm_eps is None else config.kv_latent_norm_eps
            self.kv_a_layernorm = HfExtRMSNorm(self.kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=config.attention_output_bias)

    def uses_rerope(self) -> bool:
        """MLA layers implement no ReRoPE: switched on, they say so instead of ignoring it."""
        if self.config.rerope_mode != "off":
            raise ValueError(
                f"`rerope_mode={self.config.rerope_mode!r}` is not supported by MLA layers (layer {self.layer_idx}); "
                "set it back to 'off'."
            )
        return False

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, q_len = hidden_states.shape[:2]
        q_nope, q_rope = self._queries(hidden_states, position_ids)
        c_kv, k_rope = self._latents(hidden_states)
        if self.uses_rope and self.qk_rope_head_dim:
            q_rope, k_rope = self._rotate(q_rope, k_rope, position_embeddings)
        if past_key_values is not None:
            # One "head" for both tensors (the rotary keys of all groups side by side): static cache layers allocate
            # keys and values with the same number of heads.
            batch, groups, _, width = k_rope.shape
            flat = k_rope.transpose(1, 2).reshape(batch, 1, q_len, groups * width)
            c_kv, flat = past_key_values.update(c_kv, flat, self.layer_idx)
            k_rope = flat.view(batch, flat.shape[2], groups, width).transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        if self.use_absorbed(q_len, c_kv.shape[2]):
            weight = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
            w_uk, w_uv = weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
            mask = attention_mask if attention_mask is not None or q_len == 1 else causal_bool_mask(
                q_len, c_kv.shape[2], c_kv.device)
            attn_output, attn_weights = absorbed_attention_with_weights(
                q_nope, q_rope, c_kv[:, 0], k_rope, w_uk, w_uv, self.scaling, mask, dropout)
            attn_output = attn_output.transpose(1, 2)
        else:
            attn_output, attn_weights = self._expanded(q_nope, q_rope, c_kv, k_rope, attention_mask, dropout,
                                                       position_ids, **kwargs)
        return self.o_proj(attn_output.reshape(batch, q_len, -1)), attn_weights

    def _queries(self, hidden_states, position_ids):
        if self.q_lora_rank is None:
            queries = self.q_proj(hidden_states)
        else:
            queries = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        batch, q_len = hidden_states.shape[:2]
        queries = queries.view(batch, q_len, self.num_heads, self.qk_head_dim).transpose(1, 2)
        return scale_queries_logn(queries, self, position_ids).split([self.qk_nope_head_dim, self.qk_rope_head_dim],
                                                                     dim=-1)

    def _latents(self, hidden_states):
        """The cached quantities: latent [b, 1, s, d_c] (normalised if `kv_latent_norm`), rotary keys [b, g, s, d_r]."""
        batch, q_len = hidden_states.shape[:2]
        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.rope_key_heads * self.qk_rope_head_dim], dim=-1)
        if self.config.kv_latent_norm:
            c_kv = self.kv_a_layernorm(c_kv)
        k_rope = k_rope.view(batch, q_len, self.rope_key_heads, self.qk_rope_head_dim).transpose(1, 2)
        return c_kv.view(batch, 1, q_len, self.kv_lora_rank), k_rope

    def _rotate(self, q_rope, k_rope, position_embeddings):
        cos, sin = position_embeddings
        if cos.shape[-1] != self.qk_rope_head_dim:  # the first qk_rope_head_dim / 2 frequencies of the table
            columns = kept_rotary_columns(cos.shape[-1], self.qk_rope_head_dim).to(cos.device)
            cos, sin = cos[..., columns], sin[..., columns]
        rotate = rotate_interleaved if self.config.rope_interleave else apply_rotary
        return rotate(q_rope, cos, sin), rotate(k_rope, cos, sin)

    def use_absorbed(self, q_len: int, kv_len: int) -> bool:
        """Whether this call runs the absorbed form: `mla_implementation`, or for "auto" the form with fewer
        multiply-adds per head (the expansion costs kv_len·d_c·(d_nope + d_v) whatever the query length)."""
        mode = self.config.mla_implementation
        absorbable = type(self.kv_b_proj) is nn.Linear
        if mode == "absorbed" and not absorbable:
            raise ValueError(
                f"`mla_implementation='absorbed'` needs `kv_b_proj` to be a plain nn.Linear to fold its weight into "
                f"the query and output, but layer {self.layer_idx} has {type(self.kv_b_proj).__name__} (an adapter?); "
                "use 'auto' or 'expanded', or merge the adapter first."
            )
        if mode != "auto":
            return mode == "absorbed"
        d_c, d_nope, d_rope, d_v = self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        expanded = kv_len * d_c * (d_nope + d_v) + q_len * kv_len * (d_nope + d_rope + d_v)
        absorbed = q_len * d_c * (d_nope + d_v) + q_len * kv_len * (2 * d_c + d_rope)
        return absorbable and absorbed < expanded

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, attention_mask, dropout, position_ids, **kwargs):
        batch, _, kv_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(batch, kv_len, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope.repeat_interleave(self.num_heads // self.rope_key_heads, dim=1) if self.rope_key_heads > 1 \
            else k_rope.expand(-1, self.num_heads, -1, -1)
        queries, keys = torch.cat([q_nope, q_rope], dim=-1), torch.cat([k_nope, k_rope], dim=-1)
        padding = 0
        if self.config._attn_implementation == "sdpa" and self.v_head_dim != self.qk_head_dim:
            # torch's fused CPU attention needs equal query/key and value widths; otherwise it falls back to a kernel
            # that holds all L×L scores (4× slower at 2k tokens). Zero columns change neither scores nor outputs.
            padding = self.qk_head_dim - self.v_head_dim
            if padding > 0:
                values = nn.functional.pad(values, (0, padding))
            else:
                queries, keys = nn.functional.pad(queries, (0, -padding)), nn.functional.pad(keys, (0, -padding))
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            queries,
            keys,
            values,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
        if padding > 0:
            attn_output = attn_output[..., : self.v_head_dim]
        return attn_output, attn_weights


class HfExtDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfExtConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        attention_class = HfExtMLAttention if config.attention_types[layer_idx] == "mla" else HfExtAttention
        self.self_attn = attention_class(config, layer_idx)
        self.mlp = HfExtMLP(config)
        self.input_layernorm = HfExtRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HfExtRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        past_key_values = either_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class HfExtPreTrainedModel(PreTrainedModel):
    config: HfExtConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfExtDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": HfExtDecoderLayer, "attentions": HfExtAttentionBase}

    # Set by the installed hf_ext package (`hf_ext.hub.push_with_model_card`) so that `push_to_hub` uploads the
    # model card rendered from hf_ext's template. The copy of this file that travels with a checkpoint leaves it
    # unset and falls back to transformers' own push and default card.
    hub_publisher: Callable | None = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, after checking the config: an invalid one (e.g. a mistyped
        `config.rerope_mode`) is refused with a ValueError before any file is written."""
        self.config.validate_architecture()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *, tags: list[str] | None = None, **kwargs) -> str:
        """Upload the model like transformers does; with hf_ext installed, the README is hf_ext's model card."""
        if type(self).hub_publisher is None:
            return super().push_to_hub(repo_id, tags=tags, **kwargs)
        return type(self).hub_publisher(self, repo_id, tags=tags, **kwargs)


class HfExtModel(HfExtPreTrainedModel):
    def __init__(self, config: HfExtConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HfExtDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HfExtRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HfExtRotaryEmbedding(config)
        self.patch_embed = HfExtPatchEmbedding(config) if config.has_vision else None
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, max_patches, channels * patch * patch)`, *optional*):
            Each row's image patches in order (row-major within an image), zero-padded to the longest row; they
            replace the `image_token_id` tokens of `input_ids`. Made by the processor.
        image_grid_hw (`torch.LongTensor` of shape `(batch, max_images, 2)`, *optional*):
            (height, width) in patches of each row's images in order, (0, 0) for padding. The rotary positions of
            the model's `position_layout` are a function of `input_ids`, these grids and `attention_mask`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        past_key_values = either_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.patch_embed is not None:
                inputs_embeds = self._insert_image_patches(input_ids, inputs_embeds, pixel_values, image_grid_hw)
        if use_cache and past_key_values is None:
            # Built from the config, so sliding layers get sliding-window cache layers.
            past_key_values = DynamicCache(config=self.config)
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self._default_position_ids(input_ids, inputs_embeds, image_grid_hw, attention_mask,
                                                      past_seen_tokens)
        # Multimodal layouts give positions [axes, batch, seq]; the masks and the layers see token order only.
        token_position_ids = position_ids if position_ids.dim() == 2 else None

        if not isinstance(mask_by_layer_type := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_NAME: past_key_values,
                "position_ids": token_position_ids,
            }
            mask_by_layer_type = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                mask_by_layer_type["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        rerope_inputs = self._rerope_inputs(inputs_embeds, attention_mask, past_key_values)
        if rerope_inputs is not None:
            if token_position_ids is None:
                raise ValueError("rerope_mode needs positions [batch, seq]; it does not apply to multimodal "
                                 f"position layouts (position_layout={self.config.position_layout!r}).")
            kwargs["rerope_inputs"] = rerope_inputs
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_by_layer_type[decoder_layer.layer_type],
                position_embeddings=position_embeddings,
                position_ids=token_position_ids,
                use_cache=use_cache,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: past_key_values})

    def get_position_ids(self, input_ids: torch.Tensor, image_grid_hw: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary positions [axes, batch, seq] (float32) of whole sequences under the config's `position_layout`.

        A pure function of the token layout: image patch tokens (`image_token_id`, checked to sit between their
        markers), the grids in `image_grid_hw` and the padding in `attention_mask`. To decode, take the last
        columns of the positions of the sequence so far; `generate()` does this for you, and nothing is stored
        between calls.
        """
        config = self.config
        if config.has_vision:
            check_image_markers(input_ids, config.image_token_id, config.image_start_token_id,
                                config.image_end_token_id, attention_mask)
            is_patch = input_ids == config.image_token_id
        else:
            is_patch = torch.zeros_like(input_ids, dtype=torch.bool)
        # Built where input_ids live, from the grid tensor itself: no copy to the host, no wait for the device.
        return build_position_ids(is_patch, image_grid_hw, config.position_layout, attention_mask, dtype=torch.float32)

    def _default_position_ids(self, input_ids, inputs_embeds, image_grid_hw, attention_mask, past_seen_tokens):
        config = self.config
        layout_positions = input_ids is not None and (config.has_vision or config.position_layout != "flatten")
        if layout_positions and past_seen_tokens == 0:
            padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            return self.get_position_ids(input_ids, image_grid_hw, padding)
        if config.has_vision and past_seen_tokens > 0:
            # Without the earlier tokens the images in the cache are unknown; a token index would be wrong after
            # an image in most layouts. generate() passes positions; a hand-written loop must too.
            raise ValueError(
                "position_ids are required when continuing from a cache with an image model: pass "
                "`model.get_position_ids(all_input_ids, image_grid_hw, attention_mask)[..., -new_tokens:]`, or use "
                "generate(), which does this."
            )
        # Text only: every layout gives text tokens RoPE-1D positions, i.e. token indices.
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
        return position_ids.unsqueeze(0)

    def _insert_image_patches(self, input_ids, inputs_embeds, pixel_values, image_grid_hw):
        """Replace each row's image patch tokens, in order, by the embeddings of that row's pixel patches."""
        is_patch = input_ids == self.config.image_token_id
        patches_per_row = is_patch.sum(dim=1)
        if pixel_values is None:
            if patches_per_row.any():
                raise ValueError("input_ids contain image patch tokens (image_token_id) but no pixel_values were given.")
            return inputs_embeds
        if pixel_values.dim() != 3 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values must be [batch={input_ids.shape[0]}, max_patches, channels·patch²], got "
                             f"shape {tuple(pixel_values.shape)}.")
        # Both checks in one flag, read once (a device sync); the messages are built only when it is set.
        too_many = patches_per_row.max() > pixel_values.shape[1]
        grid_patches = None
        if image_grid_hw is not None:
            grid_patches = (image_grid_hw[..., 0] * image_grid_hw[..., 1]).sum(dim=-1).to(patches_per_row.device)
        if bool(too_many | (grid_patches is not None and (grid_patches != patches_per_row).any())):
            if grid_patches is not None and not torch.equal(grid_patches, patches_per_row):
                raise ValueError(f"image_grid_hw covers {grid_patches.tolist()} patches per row but input_ids hold "
                                 f"{patches_per_row.tolist()} image patch tokens; each grid's height × width must "
                                 "equal its image's number of patch tokens.")
            raise ValueError(f"input_ids hold up to {int(patches_per_row.max())} image patch tokens per row but "
                             f"pixel_values has {pixel_values.shape[1]} patches per row.")
        if pixel_values.shape[1] == 0:  # no patches given, and (checked above) no patch tokens to fill
            return inputs_embeds
        # Patch token k of a row takes that row's patch k: gathered by index, with no data-dependent shape (boolean
        # indexing would make the host wait for the device to learn how many patches there are).
        patch_embeds = self.patch_embed(pixel_values.to(inputs_embeds.dtype))  # [B, max_patches, hidden]
        index = (is_patch.long().cumsum(dim=1) - 1).clamp(min=0).to(patch_embeds.device)
        gathered = patch_embeds.gather(1, index[..., None].expand(-1, -1, patch_embeds.shape[-1]))
        return torch.where(is_patch[..., None], gathered.to(inputs_embeds.dtype), inputs_embeds)

    def _rerope_inputs(self, inputs_embeds, attention_mask, past_key_values) -> dict | None:
        """Per layer type, what ReRoPE layers need: key positions (from the 2D mask, −1 = padding) and the rotary
        frequencies. None when no layer applies ReRoPE."""
        layers = [layer for layer in self.layers if layer.self_attn.uses_rerope()]
        if not layers:
            return None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("rerope_mode needs the 2D attention mask (batch, tokens), not a prepared 4D mask.")
        batch, q_len = inputs_embeds.shape[:2]
        inputs = {}
        for layer in layers:
            if layer.layer_type in inputs:
                continue
            layer_idx = layer.self_attn.layer_idx
            if past_key_values is None:
                kv_length, kv_offset = q_len, 0
            elif layer.self_attn.sliding_window is None:
                # Every key so far, from the first: also what a static cache's buffer holds in its first slots (its
                # get_mask_sizes reports the whole buffer instead).
                kv_length, kv_offset = past_key_values.get_seq_length(layer_idx) + q_len, 0
            elif getattr(past_key_values, "is_compileable", False):
                raise ValueError(f"rerope_mode={self.config.rerope_mode!r} on a sliding-window layer (layer "
                                 f"{layer_idx}) needs the dynamic cache; a static sliding-window cache keeps its "
                                 "keys in a ring buffer out of order. Use cache_implementation='dynamic'.")
            else:
                kv_length, kv_offset = past_key_values.get_mask_sizes(q_len, layer_idx)
            inputs[layer.layer_type] = {
                "key_positions": key_positions_from_mask(attention_mask, batch, kv_length, kv_offset,
                                                         inputs_embeds.device),
                "inv_freq": self.rotary_emb.inv_freq,
                "attention_scaling": self.rotary_emb.attention_scaling,
            }
        return inputs


class HfExtForCausalLM(HfExtPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HfExtConfig):
        super().__init__(config)
        self.model = HfExtModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values, image_grid_hw: images of a model with `image_patch_size` set (see `HfExtModel.forward`).
        cache: the key/value cache under its transformers >= 5.24 name; `past_key_values` is the same, older name.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        loss_function = self.loss_function
        if labels is not None and self.training and getattr(loss_function, "fused", False):
            # A loss that reads hidden states (hf_ext.losses.TailCappedLoss(fused=True)) runs lm_head chunk by
            # chunk and never holds the full [tokens, vocab] logits; there are then no logits to return.
            loss = loss_function.loss_from_hidden_states(hidden_states, self.lm_head, labels, **kwargs)
            logits = None
        else:
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """Positions of the prompt under the model's layout; generate() then gives each new (text) token the last
        position + 1 on every axis, which is what every layout gives text after a closed image."""
        config = self.config
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        is_ids = input_ids.dim() == 2 and not input_ids.is_floating_point() and input_ids.shape[1] > 0
        if not is_ids or (config.position_layout == "flatten" and not config.has_vision):
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return self.model.get_position_ids(input_ids, model_kwargs.get("image_grid_hw"),
                                           model_kwargs.get("attention_mask"))

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Beams and several sequences per prompt repeat each row; multi-axis positions [axes, batch, seq] repeat
        along their batch dimension (recent transformers do this themselves; older releases repeat the first one)."""
        positions = model_kwargs.pop("position_ids", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if positions is not None:
            model_kwargs["position_ids"] = positions.repeat_interleave(expand_size, dim=positions.dim() - 2)
        return input_ids, model_kwargs

    def create_masks_for_generate(self, *args, **kwargs):
        """With a static cache `generate` prepares 4D masks up front; ReRoPE layers read key positions from the 2D
        mask, so with `rerope_mode` on it goes through as it is (the model builds the other layers' masks itself)."""
        if self.config.rerope_mode != "off":
            return kwargs.get("attention_mask")
        return create_masks_for_generate(*args, **kwargs)

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        """A draft model's `generate` inside assisted decoding gets no mask when the main model's was all ones
        (transformers drops it), and would then take every generated ``pad_token_id`` for padding — a hole in the
        middle of the sequence, which ReRoPE refuses. No mask there means no padding: all ones."""
        if getattr(generation_config, "is_assistant", False):
            return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)
        return super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """The images go into the prompt's forward only: later steps read them from the cache. Recent transformers
        drop `pixel_values` outside the prefill themselves; older releases leave it to the model. A forward over an
        empty cache is a prefill whatever transformers calls it: a draft model in assisted decoding gets its first
        forward flagged as a later one, and without the images it could not place the image tokens."""
        cache = kwargs.get(CACHE_NAME)
        if not is_first_iteration and (cache is None or cache.get_seq_length() == 0):
            is_first_iteration = True
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("pixel_values", None)
        return inputs


__all__ = ["HfExtPreTrainedModel", "HfExtModel", "HfExtForCausalLM"]
