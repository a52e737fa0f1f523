"""Configuration of the HfExt decoder family.

A Llama-style decoder (RMSNorm, SwiGLU, RoPE, grouped-query attention) whose attention is configurable per layer.
This file is copied next to the weights by ``save_pretrained`` (``register_for_auto_class``) and must stay loadable
with ``trust_remote_code=True`` where hf_ext is not installed: it imports only torch, transformers and
huggingface_hub.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from .positions_hfext import POSITION_AXES, POSITION_LAYOUTS

# Kinds of attention layer. `sliding_attention` layers see their `sliding_window` most recent keys (self included)
# and get a sliding-window cache layer; `full_attention` layers see every previous key.
HFEXT_LAYER_TYPES = ("full_attention", "sliding_attention")
# Position encoding of a layer: `rope` rotates queries and keys, `none` leaves them as they are (NoPE).
HFEXT_POSITION_ENCODINGS = ("rope", "none")
# What computes a layer's attention: `gqa` (grouped-query attention over per-head keys and values; MHA when
# num_key_value_heads == num_attention_heads) or `mla` (multi-head latent attention, DeepSeek-V2: the cache holds a
# low-rank latent and the rotary key instead of per-head keys and values).
HFEXT_ATTENTION_TYPES = ("gqa", "mla")
# How MLA layers compute attention: `expanded` up-projects the latents into per-head keys/values (training, prefill),
# `absorbed` folds the up-projections into the query and the output (decoding), `auto` picks the cheaper per call.
HFEXT_MLA_IMPLEMENTATIONS = ("auto", "expanded", "absorbed")


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------------------------
# ReRoPE and log-n options, defined once. `HfExtConfig` declares them as fields; hf_ext.attention's `hfx_rerope`,
# `hfx_leaky_rerope` and `hfx_logn` read the same names from any transformers config (Llama, Qwen2, ...) and fill in
# and check them with these defaults and functions. Each check raises a ValueError naming the option, the value and
# what is allowed.

# How RoPE layers treat distances beyond `rerope_window` at run time (see `rerope_mode`).
HFEXT_REROPE_MODES = ("off", "rerope", "leaky_rerope")
# k of Leaky ReRoPE: beyond the window a token adds 1/k to the distance.
DEFAULT_REROPE_LEAKY_FACTOR = 16.0
# Lower bound of the log-n factor: 1.0 leaves queries inside the training length unchanged.
DEFAULT_LOGN_CLIP_MIN = 1.0
# `logn_scaling` where a stock checkpoint gets `hfx_rerope` / `hfx_leaky_rerope`: on, as ReRoPE is meant to be used.
# HfExt models default to False instead: there it is a per-layer architecture choice, off for Llama equivalence.
DEFAULT_LOGN_SCALING_WITH_REROPE = True


def default_rerope_window(max_position_embeddings: int) -> int:
    """`rerope_window` when unset: a quarter of the trained context (at least 1 token)."""
    return max(1, max_position_embeddings // 4)


def default_logn_training_length(max_position_embeddings: int) -> int:
    """`logn_training_length` when unset: the context length the model was trained at."""
    return max_position_embeddings


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    """A real number that is not NaN or ±inf (``x < 1`` is False for NaN, so range checks alone let NaN through)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rerope_mode(value) -> None:
    if value not in HFEXT_REROPE_MODES:
        raise ValueError(f"`rerope_mode` is {value!r}; allowed values are {list(HFEXT_REROPE_MODES)}.")


def check_rerope_window(value) -> None:
    if not _is_integer(value) or value < 1:
        raise ValueError(f"`rerope_window` must be a positive integer (a number of tokens), got {_describe(value)}.")


def check_rerope_leaky_factor(value) -> None:
    if not _is_finite_number(value) or value < 1:
        raise ValueError(
            f"`rerope_leaky_factor` must be a finite number >= 1 (1 = plain RoPE), got {_describe(value)}.")


def check_logn_scaling(value, num_layers: int | None = None) -> None:
    """One flag; with `num_layers`, also a list of one flag per layer (HfExt configs)."""
    if isinstance(value, bool):
        return
    if num_layers is None:
        raise ValueError(f"`logn_scaling` must be True or False, got {_describe(value)}.")
    if not isinstance(value, list) or len(value) != num_layers or not all(isinstance(v, bool) for v in value):
        raise ValueError(
            f"`logn_scaling` must be True or False, or a list with one entry per layer (num_hidden_layers="
            f"{num_layers}) of True or False, got {_describe(value)}."
        )


def check_logn_training_length(value, logn_on: bool = True) -> None:
    """At least 2 where log-n scaling is on (it is the base of a logarithm), a positive integer otherwise."""
    low = 2 if logn_on else 1
    if not _is_integer(value) or value < low:
        why = "it is the base of the log-n logarithm" if logn_on else "at least 2 once `logn_scaling` is on"
        raise ValueError(
            f"`logn_training_length` must be an integer of at least {low} ({why}), got {_describe(value)}."
        )


def check_logn_clip_min(value) -> None:
    if value is not None and (not _is_finite_number(value) or value < 0):
        raise ValueError(f"`logn_clip_min` must be None (no clipping) or a finite number >= 0, got {_describe(value)}.")


@strict
class HfExtConfig(PreTrainedConfig):
    r"""
    Configuration of [`HfExtModel`] / [`HfExtForCausalLM`].

    With the defaults every layer is a full-attention RoPE layer and the model computes exactly what
    `LlamaForCausalLM` computes with the same weights.

    Args:
        vocab_size (`int`): size of the token vocabulary.
        hidden_size (`int`): width of the residual stream.
        intermediate_size (`int`): width of the SwiGLU feed-forward block.
        num_hidden_layers (`int`): number of decoder layers.
        num_attention_heads (`int`): number of query heads.
        num_key_value_heads (`int`, *optional*): number of key/value heads (grouped-query attention); must divide
            `num_attention_heads`. Defaults to `num_attention_heads`.
        head_dim (`int`, *optional*): width of one head. Defaults to `hidden_size // num_attention_heads`, which
            then must divide evenly; set it explicitly for models whose heads are wider (Qwen3).
        hidden_act (`str`): activation of the gate projection.
        max_position_embeddings (`int`): the context length the model is trained for.
        initializer_range (`float`): standard deviation of the normal weight initialisation.
        rms_norm_eps (`float`): epsilon of the RMSNorms.
        tie_word_embeddings (`bool`): share the input embedding with the output projection.
        rope_parameters (`dict`, *optional*): rotary parameters in transformers' v5 form, e.g.
            `{"rope_type": "default", "rope_theta": 10000.0}`; any `rope_type` of `ROPE_INIT_FUNCTIONS` (llama3,
            yarn, linear, dynamic, longrope) works.
        attention_bias (`bool`): biases on the query, key and value projections.
        attention_output_bias (`bool`, *optional*): bias on the output projection; defaults to `attention_bias`
            (Llama ties both, Qwen2 has biases on q/k/v only).
        attention_dropout (`float`): dropout on the attention probabilities during training.
        mlp_bias (`bool`): biases in the feed-forward block.
        qk_norm (`bool`): RMSNorm over each query and key head before the rotation (Qwen3).
        layer_types (`list[str]`, *optional*): per layer, one of `"full_attention"`, `"sliding_attention"`.
            Defaults to all full attention. Sliding layers need `sliding_window`.
        sliding_window (`int`, *optional*): number of keys a sliding layer sees, the query's own included.
        position_encodings (`list[str]`, *optional*): per layer, `"rope"` or `"none"` (no position encoding).
            Defaults to RoPE everywhere.
        logn_scaling (`bool` or `list[bool]`): multiply each query by `max(logn_clip_min, log(n) / log(N))`, where
            n is the number of keys the query sees and N is `logn_training_length` (entropy-invariant attention).
            One value for all layers or one per layer.
        logn_training_length (`int`, *optional*): the N above, the length at which the factor is 1. Defaults to
            `max_position_embeddings`.
        logn_clip_min (`float`, *optional*): lower bound of the log-n factor (1.0: identity inside the training
            length; `None`: no clipping).
        rerope_mode (`str`): `"off"` (plain RoPE: what you train with), `"rerope"` or `"leaky_rerope"`: RoPE layers
            keep distances below `rerope_window` and cap (ReRoPE) or compress (Leaky ReRoPE) longer ones, so the
            model never sees a distance it was not trained on. The switch between training and inference of
            HWFA+ReRoPE models; it is saved with the config. Sliding layers whose window is not larger than
            `rerope_window` are unaffected. Switch it between generations, not within one (the cache layout differs).
        rerope_window (`int`, *optional*): the kept distance w; defaults to `max_position_embeddings // 4`.
        rerope_leaky_factor (`float`): k of Leaky ReRoPE: beyond the window a token adds 1/k to the distance.
        attention_types (`list[str]`, *optional*): per layer, `"gqa"` (the default: grouped-query attention with
            per-head keys and values in the cache) or `"mla"` (multi-head latent attention: the cache holds a
            `kv_lora_rank` latent and `mla_rope_key_heads` rotary keys per token).
        kv_lora_rank (`int`, *optional*): width d_c of the cached key/value latent of MLA layers; at most
            `hidden_size`. Required when a layer is `"mla"`.
        q_lora_rank (`int`, *optional*): width of the query latent of MLA layers (query compression with an RMSNorm
            in between, DeepSeek-V2/V3); `None` projects queries directly (DeepSeek-V2-Lite).
        qk_nope_head_dim (`int`, *optional*): per-head query/key width without position encoding (0 allowed).
            Defaults to `head_dim`.
        qk_rope_head_dim (`int`, *optional*): per-head width of the decoupled rotary query/key; even, at most
            `head_dim`, defaults to `head_dim`. MLA layers rotate with the first `qk_rope_head_dim // 2` frequencies
            of the model's rotary table, which is computed for `head_dim` (so DeepSeek checkpoints, whose table is
            computed for the rotary width, set `head_dim = qk_rope_head_dim`). The softmax scale of MLA layers is
            `(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`, times YaRN's `mscale²` when `rope_parameters` has
            `mscale_all_dim` (as DeepSeek computes it).
        v_head_dim (`int`, *optional*): per-head value width of MLA layers. Defaults to `head_dim`.
        mla_rope_key_heads (`int`): number of rotary keys per token; 1 is DeepSeek's single shared key, larger
            values give one key per group of `num_attention_heads // mla_rope_key_heads` heads (what an exact
            conversion of a GQA model needs). Must divide `num_attention_heads`.
        kv_latent_norm (`bool`): RMSNorm on the key/value latent before caching (DeepSeek: True). Converted GQA
            models set False, since their latent is a linear factor of the original projections.
        kv_latent_norm_eps (`float`, *optional*): epsilon of that latent RMSNorm; defaults to `rms_norm_eps`.
            transformers' DeepSeek-V2/V3 use 1e-6 whatever `rms_norm_eps` says, and `from_deepseek` copies theirs.
        rope_interleave (`bool`): rotary layout of the MLA rotary dims: True for interleaved pairs (x0, x1), (x2, x3)
            as in DeepSeek checkpoints, False for rotate-half pairs (x_i, x_{i+d/2}) as in Llama.
        mla_implementation (`str`): `"auto"` (default: per call, whichever of the two exact forms needs fewer
            multiply-adds — the expanded form for training and prefill, the absorbed one for decoding),
            `"expanded"` or `"absorbed"`.
        position_layout (`str`): how tokens get rotary positions (see positions_hfext.py): `"flatten"` (the
            default: RoPE-1D over token indices), `"mrope"` (Qwen2-VL's M-RoPE: time/row/column axes, frequencies in
            contiguous `mrope_section` blocks), `"rope_tie_v1"` or `"rope_tie_v2"` (RoPE-Tie: row/column axes,
            frequency f follows axis f mod 2). Text-only input gets exactly RoPE-1D positions in every layout.
        mrope_section (`list[int]`, *optional*): for `"mrope"`, the number of rotary frequencies of the time, row and
            column axes (summing to `head_dim // 2`). Defaults to Qwen2-VL's proportions, [16, 24, 24] of 64.
        image_patch_size (`int`, *optional*): side of the square pixel patches of images; `None` (the default) makes
            a text-only model. With it set, the model embeds `pixel_values` through a patch-embedding layer.
        image_channels (`int`): colour channels of images (3 for RGB, 1 for grey).
        image_token_id (`int`, *optional*): token standing for one image patch in `input_ids`; the processor writes
            one per patch, between `image_start_token_id` and `image_end_token_id`. Required with `image_patch_size`.
        image_start_token_id, image_end_token_id (`int`, *optional*): the markers around each image.
    """

    model_type = "hf_ext"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: int | float = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    position_encodings: list[str] | None = None
    logn_scaling: bool | list[bool] = False
    logn_training_length: int | None = None
    logn_clip_min: float | None = DEFAULT_LOGN_CLIP_MIN
    rerope_mode: str = "off"
    rerope_window: int | None = None
    rerope_leaky_factor: int | float = DEFAULT_REROPE_LEAKY_FACTOR
    attention_types: list[str] | None = None
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    mla_rope_key_heads: int = 1
    kv_latent_norm: bool = True
    kv_latent_norm_eps: float | None = None
    rope_interleave: bool = False
    mla_implementation: str = "auto"
    position_layout: str = "flatten"
    mrope_section: list[int] | None = None
    image_patch_size: int | None = None
    image_channels: int = 3
    image_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.position_encodings is None:
            self.position_encodings = ["rope"] * self.num_hidden_layers
        if self.attention_types is None:
            self.attention_types = ["gqa"] * self.num_hidden_layers
        if "mla" in self.attention_types and isinstance(self.head_dim, int):
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) is None:
                    setattr(self, name, self.head_dim)
        if self.position_layout == "mrope" and self.mrope_section is None and isinstance(self.head_dim, int):
            side = 3 * (self.head_dim // 2) // 8  # Qwen2-VL: 24 of 64 frequencies each for rows and columns
            self.mrope_section = [self.head_dim // 2 - 2 * side, side, side]
        if isinstance(self.logn_scaling, bool):
            self.logn_scaling = [self.logn_scaling] * self.num_hidden_layers
        if self.logn_training_length is None:
            self.logn_training_length = default_logn_training_length(self.max_position_embeddings)
        if self.rerope_window is None and isinstance(self.max_position_embeddings, int):
            self.rerope_window = default_rerope_window(self.max_position_embeddings)
        # Checked here, not only in @strict's validators, because those wrap every error in a
        # StrictDataclassClassValidationError; a plain ValueError is what callers catch.
        self.validate_architecture()
        super().__post_init__(**kwargs)
        self._validate_rope_fields()  # `rope_theta=` given as a keyword reaches rope_parameters only in the line above

    # Options users change on a built config, between generations (`model.config.rerope_mode = "rerope"`): such an
    # assignment re-validates the config and is undone if it fails, so a typo never reaches a forward pass or a saved
    # checkpoint. Structural fields (layer counts, per-layer lists) are often changed in several steps, so they are
    # checked when the config is saved instead.
    RUNTIME_OPTIONS = ("rerope_mode", "rerope_window", "rerope_leaky_factor", "logn_clip_min", "logn_training_length",
                       "logn_scaling", "mla_implementation", "position_layout")

    def __setattr__(self, name, value):
        # `_post_init_done` is transformers' own marker of a finished config; without it (older releases) the check
        # falls to save time
        if name not in self.RUNTIME_OPTIONS or not self.__dict__.get("_post_init_done", False):
            super().__setattr__(name, value)
            return
        previous = self.__dict__[name]
        super().__setattr__(name, value)
        try:
            self.validate_architecture()
        except ValueError:
            super().__setattr__(name, previous)
            raise

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`, after checking the whole config: an invalid one is refused with a
        ValueError before anything is written (it would not load again)."""
        self.validate_architecture()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # Validation: every error names the field, the value and what is allowed. `config.validate()` re-runs it.

    def validate_architecture(self):
        self._validate_scalar_fields()
        self._validate_per_layer_fields()
        self._validate_mla_fields()
        self._validate_position_fields()

    def validate_layer_type(self):
        """Covered by `validate_architecture` (transformers' version does not know which types this model allows)."""

    def _validate_scalar_fields(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {_describe(value)}.")
        if self.head_dim is None:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size}) "
                "when `head_dim` is not given; set `head_dim` explicitly for heads of another width."
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be a positive even integer (rotary pairs), got {_describe(self.head_dim)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}); allowed values are its divisors "
                f"{[d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]}."
            )
        if not (_is_finite_number(self.attention_dropout) and 0.0 <= self.attention_dropout < 1.0):
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {_describe(self.attention_dropout)}.")
        if not (_is_finite_number(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be a finite number > 0, got {_describe(self.rms_norm_eps)}.")
        if not (_is_finite_number(self.initializer_range) and 0.0 <= self.initializer_range <= 1.0):
            raise ValueError(f"`initializer_range` must be in [0, 1], got {_describe(self.initializer_range)}.")
        self._validate_rope_fields()

    def _validate_rope_fields(self):
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        for name in ("rope_theta", "factor"):  # NaN or ±inf here turns every rotary angle into NaN
            if name in rope and not (_is_finite_number(rope[name]) and rope[name] > 0):
                raise ValueError(
                    f"`rope_parameters['{name}']` must be a finite number > 0, got {_describe(rope[name])}.")

    def _validate_per_layer_fields(self):
        n = self.num_hidden_layers
        check_logn_scaling(self.logn_scaling, num_layers=n)
        check_logn_training_length(self.logn_training_length, logn_on=any(self.logn_scaling))
        per_layer = {"layer_types": self.layer_types, "position_encodings": self.position_encodings,
                     "attention_types": self.attention_types}
        for name, values in per_layer.items():
            if len(values) != n:
                raise ValueError(
                    f"`{name}` must have one entry per layer (num_hidden_layers={n}), got {len(values)}: {values}."
                )
        for i, kind in enumerate(self.layer_types):
            if kind not in HFEXT_LAYER_TYPES:
                raise ValueError(f"`layer_types[{i}]` is {kind!r}; allowed values are {list(HFEXT_LAYER_TYPES)}.")
        for i, kind in enumerate(self.attention_types):
            if kind not in HFEXT_ATTENTION_TYPES:
                raise ValueError(
                    f"`attention_types[{i}]` is {kind!r}; allowed values are {list(HFEXT_ATTENTION_TYPES)}."
                )
        for i, kind in enumerate(self.position_encodings):
            if kind not in HFEXT_POSITION_ENCODINGS:
                raise ValueError(
                    f"`position_encodings[{i}]` is {kind!r}; allowed values are {list(HFEXT_POSITION_ENCODINGS)}."
                )
        if "sliding_attention" in self.layer_types:
            if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window <= 0:
                raise ValueError(
                    f"`sliding_window` must be a positive integer (the number of keys a sliding layer sees, itself "
                    f"included) when `layer_types` contains 'sliding_attention', got {_describe(self.sliding_window)}."
                )
        check_logn_clip_min(self.logn_clip_min)
        check_rerope_mode(self.rerope_mode)
        check_rerope_window(self.rerope_window)
        check_rerope_leaky_factor(self.rerope_leaky_factor)

    def _validate_mla_fields(self):
        if self.mla_implementation not in HFEXT_MLA_IMPLEMENTATIONS:
            raise ValueError(
                f"`mla_implementation` is {self.mla_implementation!r}; allowed values are "
                f"{list(HFEXT_MLA_IMPLEMENTATIONS)}."
            )
        if "mla" not in self.attention_types:
            if self.mla_implementation == "absorbed":
                raise ValueError(
                    "`mla_implementation='absorbed'` applies to MLA layers, but `attention_types` has none; "
                    "set some `attention_types` to 'mla' or leave `mla_implementation='auto'`."
                )
            return
        if self.kv_lora_rank is None:
            raise ValueError("`kv_lora_rank` is required when `attention_types` contains 'mla'.")
        limits = {"kv_lora_rank": (1, self.hidden_size), "q_lora_rank": (1, self.hidden_size),
                  "qk_nope_head_dim": (0, None), "qk_rope_head_dim": (0, self.head_dim), "v_head_dim": (1, None),
                  "mla_rope_key_heads": (1, self.num_attention_heads)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if value is None and name == "q_lora_rank":
                continue
            allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
                why = {"kv_lora_rank": " (the latent is a projection of the hidden state, so it has rank at most "
                                       "hidden_size)",
                       "q_lora_rank": " (or None for an uncompressed query)",
                       "qk_rope_head_dim": " (the rotary frequencies come from the head_dim table)"}.get(name, "")
                raise ValueError(f"`{name}` must be an integer {allowed}{why} for MLA layers, got {_describe(value)}.")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"`qk_rope_head_dim` must be even (rotary pairs), got {self.qk_rope_head_dim}.")
        eps = self.kv_latent_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
            raise ValueError(f"`kv_latent_norm_eps` must be a positive number or None (use rms_norm_eps), "
                             f"got {_describe(eps)}.")
        if self.qk_nope_head_dim + self.qk_rope_head_dim == 0:
            raise ValueError("`qk_nope_head_dim + qk_rope_head_dim` must be positive: MLA queries and keys need a width.")
        if self.num_attention_heads % self.mla_rope_key_heads:
            raise ValueError(
                f"`mla_rope_key_heads` ({self.mla_rope_key_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}); allowed values are its divisors "
                f"{[d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]}."
            )
        if self.qk_norm:
            raise ValueError("`qk_norm=True` is not supported with MLA layers (`attention_types` contains 'mla').")
        if self.rerope_mode != "off":
            raise ValueError(
                f"`rerope_mode={self.rerope_mode!r}` is not supported with MLA layers; use 'off' with "
                "`attention_types` containing 'mla'."
            )

    @property
    def position_axes(self) -> int:
        """Rows of the position ids of this model's layout (1 for flatten)."""
        return POSITION_AXES[self.position_layout]

    @property
    def has_vision(self) -> bool:
        return self.image_patch_size is not None

    def _validate_position_fields(self):
        if self.position_layout not in POSITION_LAYOUTS:
            raise ValueError(
                f"`position_layout` is {self.position_layout!r}; allowed values are {list(POSITION_LAYOUTS)}."
            )
        if self.position_layout == "mrope":
            section = self.mrope_section
            if (not isinstance(section, list) or len(section) != 3 or sum(section) != self.head_dim // 2
                    or any(not isinstance(n, int) or n < 0 for n in section)):
                raise ValueError(
                    f"`mrope_section` must be 3 non-negative ints (time, row, column frequencies) summing to "
                    f"head_dim // 2 = {self.head_dim // 2}, got {section!r}."
                )
        if self.position_layout != "flatten":
            unsupported = {"attention_types containing 'mla'": "mla" in self.attention_types,
                           f"rerope_mode={self.rerope_mode!r}": self.rerope_mode != "off",
                           "logn_scaling": any(self.logn_scaling)}
            for what, present in unsupported.items():
                if present:
                    raise ValueError(
                        f"`position_layout={self.position_layout!r}` is not supported with {what}; use "
                        "position_layout='flatten' for such models."
                    )
        if self.image_patch_size is None:
            return
        for name in ("image_patch_size", "image_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {_describe(value)}.")
        marker_names = ("image_token_id", "image_start_token_id", "image_end_token_id")
        markers = [getattr(self, name) for name in marker_names]
        for name, value in zip(marker_names, markers):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"`{name}` must be a token id in [0, {self.vocab_size - 1}] when `image_patch_size` is set, "
                    f"got {_describe(value)}."
                )
        if len(set(markers)) != 3:
            raise ValueError(f"`image_token_id`, `image_start_token_id` and `image_end_token_id` must be three "
                             f"different tokens, got {markers}.")


__all__ = ["HfExtConfig", "HFEXT_ATTENTION_TYPES", "HFEXT_LAYER_TYPES", "HFEXT_MLA_IMPLEMENTATIONS",
           "HFEXT_POSITION_ENCODINGS", "HFEXT_REROPE_MODES", "DEFAULT_LOGN_CLIP_MIN",
           "DEFAULT_LOGN_SCALING_WITH_REROPE", "DEFAULT_REROPE_LEAKY_FACTOR", "check_logn_clip_min", "check_logn_scaling", "check_logn_training_length",
           "check_rerope_leaky_factor", "check_rerope_mode", "check_rerope_window", "default_logn_training_length",
           "default_rerope_window"]
