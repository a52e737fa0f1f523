"""Attention implementations for existing RoPE checkpoints: `hfx_rerope`, `hfx_leaky_rerope`, `hfx_logn`.

Used the ordinary way, with no transformers class patched::

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="hfx_rerope")       # defaults
    config = hf_ext.rerope_config(path, rerope_window=2048)                                   # or options
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="hfx_rerope")

Options are config attributes, read at every call (so `model.config.rerope_window = 1024` takes effect at once).
`rerope_config` sets and validates them; transformers itself ignores `from_pretrained` keyword arguments that its
config class does not declare, so they cannot be passed that way to Llama/Qwen/Mistral checkpoints (they can to
HfExt models, whose config declares them). Their defaults and checks are defined once, in
models/hfext/configuration_hfext.py, and shared with `HfExtConfig`:

=====================  =========================================  ==================================================
option                 default                                    meaning
=====================  =========================================  ==================================================
`rerope_window`        `max_position_embeddings // 4`             distances below it are kept; beyond it they are
                                                                  capped (ReRoPE) or compressed (Leaky)
`rerope_leaky_factor`  16 (`hfx_leaky_rerope` only)               k: beyond the window, distance grows by 1/k a token
`logn_scaling`         True for the ReRoPE variants               multiply query i by max(1, log(i+1) / log N)
`logn_training_length` `max_position_embeddings`                  N above: the length the model was trained at
=====================  =========================================  ==================================================

How it works. Transformers calls these functions after it has rotated queries and keys and updated its KV cache, so
they receive keys rotated at their own positions. The near logits use them as they are; for the far logits the keys
are rotated back by their positions (ReRoPE) or to position p/k (Leaky), using the model's own rotary frequencies
(`rope_theta`, llama3, yarn, linear). That costs O(L·d) element-wise work per call, the order of one QKᵀ product
with a single query, so a decode step costs about twice the attention arithmetic of `sdpa`. (The HfExt model family
avoids even that: its ReRoPE layers cache keys ready for the far product; see `HfExtConfig.rerope_mode`.)
Positions are recomputed from the attention mask (tokens counted from the start of each row), so left-padded
batches and `generate()` work; packed sequences with restarting position ids are rejected.
"""

import copy
import sys
from functools import partial

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import prepare_padding_mask, sdpa_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .models.hfext.configuration_hfext import (
    DEFAULT_LOGN_SCALING_WITH_REROPE,
    DEFAULT_REROPE_LEAKY_FACTOR,
    check_logn_scaling,
    check_logn_training_length,
    check_rerope_leaky_factor,
    check_rerope_window,
    default_logn_training_length,
    default_rerope_window,
)
from .models.hfext.modeling_hfext import HfExtRotaryEmbedding
from .models.hfext.ops_hfext import logn_query_scale
from .models.hfext.rerope_hfext import (
    check_query_positions,
    far_key_positions,
    far_query_positions,
    key_positions_from_mask,
    rerope_attention,
    rotate_by,
)

# Rotary types whose frequencies change with the sequence length at run time: the keys in the cache were rotated
# with other frequencies than the current ones, so they cannot be rotated back exactly (and ReRoPE replaces them).
_LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


# ---------------------------------------------------------------------------------------------------------------
# Options and checks


def _rotary_settings(config, head_dim: int, implementation: str, attention_layer=None) -> torch.Tensor:
    """The model's rotary inverse frequencies [head_dim/2], or a ValueError saying why this model is unsupported.

    They come from where the model's own rotary module takes them: scaled rope types from transformers'
    `ROPE_INIT_FUNCTIONS`, the default type from `compute_default_rope_parameters` of the model family's
    `...RotaryEmbedding` class (transformers has no shared entry for it), found in the module that defines
    `attention_layer`. Without a layer (config checks) or such a class, HfExt's own rotary class gives θ^(−2i/d).
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    rope = getattr(config, "rope_parameters", None)
    if not rope or "rope_type" not in rope:
        raise ValueError(
            f"attn_implementation={implementation!r} needs a model with rotary position embeddings (RoPE); "
            f"{model_type} has none (no `rope_parameters`). Supported: RoPE decoders such as Llama, Mistral, Qwen2, "
            "Qwen3, SmolLM."
        )
    partial_factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial_factor != 1.0 or getattr(config, "rope_interleave", False):
        raise ValueError(
            f"attn_implementation={implementation!r} supports rotary embeddings over the whole head in the "
            f"rotate-half layout; {model_type} uses partial_rotary_factor={partial_factor}"
            f"{' and an interleaved layout' if getattr(config, 'rope_interleave', False) else ''}."
        )
    rope_type = rope["rope_type"]
    if rope_type in _LENGTH_DEPENDENT_ROPE_TYPES:
        raise ValueError(
            f"attn_implementation={implementation!r} cannot be combined with rope_type={rope_type!r}, whose "
            "frequencies change with the sequence length; ReRoPE replaces such scaling: load the model with its "
            "original rope_parameters."
        )
    if rope_type == "default":
        inv_freq, _ = _family_rotary_class(attention_layer).compute_default_rope_parameters(config)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
    if not (torch.isfinite(inv_freq).all() and (inv_freq > 0).all()):
        raise ValueError(f"attn_implementation={implementation!r}: the rotary frequencies of {model_type} are not all "
                         f"finite and positive; check rope_parameters (rope_theta must be a finite number > 0), "
                         f"got {rope}.")
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"attn_implementation={implementation!r}: the rotary frequencies of {model_type} have shape "
                         f"{tuple(inv_freq.shape)}, expected ({head_dim // 2},) for head_dim={head_dim}.")
    return inv_freq  # the attention_scaling of yarn multiplies q and k alike and survives the re-rotation


def _family_rotary_class(attention_layer):
    modeling = sys.modules.get(type(attention_layer).__module__) if attention_layer is not None else None
    for name, candidate in (vars(modeling) if modeling is not None else {}).items():
        if name.endswith("RotaryEmbedding") and hasattr(candidate, "compute_default_rope_parameters"):
            return candidate
    return HfExtRotaryEmbedding


def _option(config, name: str, default):
    value = getattr(config, name, None)
    return default if value is None else value


def _logn_training_length(config) -> int:
    training_length = _option(config, "logn_training_length",
                              default_logn_training_length(config.max_position_embeddings))
    check_logn_training_length(training_length)
    return training_length


def rerope_options(config, leaky: bool) -> dict:
    """Validated ReRoPE options of a config, defaults filled in (see the module docstring)."""
    training_length = _logn_training_length(config)
    window = _option(config, "rerope_window", default_rerope_window(config.max_position_embeddings))
    check_rerope_window(window)
    factor = None
    if leaky:
        factor = _option(config, "rerope_leaky_factor", DEFAULT_REROPE_LEAKY_FACTOR)
        check_rerope_leaky_factor(factor)
        factor = float(factor)
    logn = _option(config, "logn_scaling", DEFAULT_LOGN_SCALING_WITH_REROPE)
    if isinstance(logn, list):  # an HfExt config: its layers apply their own per-layer log-n scaling
        logn = False
    check_logn_scaling(logn)
    return {"window": window, "leaky_factor": factor, "logn": logn, "training_length": training_length}


def rerope_config(config_or_path, *, rerope_window: int | None = None, rerope_leaky_factor: float | None = None,
                  logn_scaling: bool | None = None, logn_training_length: int | None = None, **from_pretrained_kwargs):
    """A checkpoint's config with the ReRoPE options set and checked, for `from_pretrained(..., config=...)`.

    transformers applies only the attributes a config class declares when `from_pretrained` gets keyword
    arguments, so options for a Llama/Qwen/Mistral checkpoint travel on its config::

        config = hf_ext.rerope_config(path, rerope_window=2048)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="hfx_rerope")

    Unsupported models (no RoPE, partial rotary, length-dependent rope types) and bad values raise here, at load,
    instead of at the first forward pass. Options left at None keep their defaults (module docstring).
    """
    from transformers import AutoConfig
    from transformers.configuration_utils import PreTrainedConfig

    if not isinstance(config_or_path, (str, bytes, PreTrainedConfig)) and not hasattr(config_or_path, "__fspath__"):
        raise ValueError(f"config_or_path must be a transformers config (PreTrainedConfig) or a checkpoint path "
                         f"(str or os.PathLike), got {config_or_path!r} ({type(config_or_path).__name__})")
    if isinstance(config_or_path, (str, bytes)) or hasattr(config_or_path, "__fspath__"):
        config = AutoConfig.from_pretrained(config_or_path, **from_pretrained_kwargs)
    else:
        config = copy.deepcopy(config_or_path)
    options = {"rerope_window": rerope_window, "rerope_leaky_factor": rerope_leaky_factor,
               "logn_scaling": logn_scaling, "logn_training_length": logn_training_length}
    for name, value in options.items():
        if value is not None:
            setattr(config, name, value)
    rerope_options(config, leaky=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    _rotary_settings(config, head_dim, "hfx_rerope")
    return config


def _cached_inv_freq(module, config, head_dim: int, implementation: str) -> torch.Tensor:
    # Derived from the config alone; kept on the module so decode steps do not recompute it.
    key = (implementation, id(config), head_dim)
    cached = module.__dict__.get("_hfx_inv_freq")
    if cached is None or cached[0] != key:
        cached = (key, _rotary_settings(config, head_dim, implementation, module))
        module.__dict__["_hfx_inv_freq"] = cached
    return cached[1]


# ---------------------------------------------------------------------------------------------------------------
# The mask factory: key positions instead of an L×L mask


def key_positions_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                       device="cpu", **kwargs) -> torch.Tensor:
    """Mask factory of the ReRoPE implementations: key positions [B, kv_length] (−1 = padding), not an L×L mask.

    Causality, the ReRoPE window and sliding windows are applied from these positions inside the kernel, so no
    quadratic mask is ever built.
    """
    padding = prepare_padding_mask(attention_mask, kv_length + kv_offset, 0) if attention_mask is not None else None
    return key_positions_from_mask(padding, batch_size, kv_length, kv_offset, device)


# ---------------------------------------------------------------------------------------------------------------
# The attention functions


def _logn_factor(key_positions, q_len, training_length, dtype):
    query_positions = key_positions[:, -q_len:].clamp(min=0)
    return logn_query_scale(query_positions, training_length)[:, None, :, None].to(dtype)


def rerope_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             *, leaky: bool = False, **kwargs):
    """`AttentionInterface` function of `hfx_rerope` / `hfx_leaky_rerope` (see the module docstring)."""
    implementation = "hfx_leaky_rerope" if leaky else "hfx_rerope"
    config = module.config
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={implementation!r} does not support attention logit soft-capping.")
    options = rerope_options(config, leaky)
    batch, _, q_len, head_dim = query.shape
    inv_freq = _cached_inv_freq(module, config, head_dim, implementation)  # also rejects unsupported models
    k_len = key.shape[2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation={implementation!r} reads padding from the 2D attention mask (batch, tokens); "
            "this call got a prepared 4D mask, which it cannot interpret."
        )
    key_positions = attention_mask  # from `key_positions_mask`
    if key_positions is None:
        key_positions = key_positions_from_mask(None, batch, k_len, 0, query.device)
    check_query_positions(key_positions, kwargs.get("position_ids"), q_len)
    scaling = module.scaling if scaling is None else scaling
    # The layer contract `uses_rope` / `uses_logn` is documented on `HfExtAttentionBase` (models/hfext/
    # modeling_hfext.py): stock layers have neither attribute, i.e. RoPE everywhere and log-n scaling left to us.
    uses_rope = getattr(module, "uses_rope", True)
    if options["logn"] and not hasattr(module, "uses_logn"):
        query = query * _logn_factor(key_positions, q_len, options["training_length"], query.dtype)
    window = options["window"]
    sliding_window = kwargs.get("sliding_window")
    if not uses_rope:  # a NoPE layer: every logit is a "near" one
        return rerope_attention(query, query, key, key, value, key_positions, k_len + q_len, scaling,
                                sliding_window=sliding_window), None
    if k_len <= window:
        # No key is farther than the window: this is ordinary attention (mask at most window × window).
        mask = _boolean_mask(key_positions, q_len, sliding_window)
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)
    positions = key_positions.clamp(min=0)
    query_positions = positions[:, -q_len:]
    leaky_factor = options["leaky_factor"]
    # Rotate from the positions transformers used to the ones the far logits need.
    if leaky_factor is None:
        query_far = rotate_by(query, window - query_positions, inv_freq)
        key_far = rotate_by(key, -positions, inv_freq)
    else:
        query_far = rotate_by(query, far_query_positions(query_positions, window, leaky_factor) - query_positions,
                              inv_freq)
        key_far = rotate_by(key, far_key_positions(positions, leaky_factor) - positions, inv_freq)
    tail = min(k_len, q_len + window - 1)
    return rerope_attention(query, query_far, key[:, :, -tail:], key_far, value, key_positions, window, scaling,
                            sliding_window=sliding_window), None


def _boolean_mask(key_positions: torch.Tensor, q_len: int, sliding_window: int | None) -> torch.Tensor:
    """[B, 1, Lq, Lk] causal (and sliding-window) mask with padding, for the short-context sdpa path."""
    k_len = key_positions.shape[-1]
    query_index = torch.arange(k_len - q_len, k_len, device=key_positions.device)[:, None]
    distance = query_index - torch.arange(k_len, device=key_positions.device)[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    return (allowed[None] & (key_positions >= 0)[:, None, :])[:, None]


def logn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`hfx_logn`: sdpa (and its usual mask) with query i scaled by max(1, log(p_i + 1) / log N).

    Only the new queries are scaled, from their own positions, so cached keys and values stay valid.
    """
    training_length = _logn_training_length(module.config)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("attn_implementation='hfx_logn' needs the position_ids of the queries (the model passes "
                         "them to its attention function; this one did not).")
    if not hasattr(module, "uses_logn"):  # a layer with it scales its own queries (see `HfExtAttentionBase`)
        factor = logn_query_scale(position_ids.clamp(min=0), training_length)
        query = query * factor[:, None, :, None].to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


ATTENTION_FUNCTIONS = {
    "hfx_rerope": (partial(rerope_attention_forward, leaky=False), key_positions_mask),
    "hfx_leaky_rerope": (partial(rerope_attention_forward, leaky=True), key_positions_mask),
    "hfx_logn": (logn_attention_forward, sdpa_mask),
}
