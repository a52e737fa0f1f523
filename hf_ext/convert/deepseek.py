"""Convert a DeepSeek-V2/V3-style checkpoint with dense MLPs into an `HfExtForCausalLM` with MLA layers.

HfExt's MLA layer uses DeepSeek's parameter names and its SwiGLU/RMSNorm blocks are DeepSeek's dense ones, so the
conversion is a config translation plus a hand-over of the tensors. What changes is the run time: the cache holds
the latent, and decoding uses the absorbed form instead of re-expanding the whole cache at every step.
"""

import os

from transformers import PreTrainedModel

from ..models.hfext import HfExtConfig, HfExtForCausalLM
from ._common import build_hfext, load_source

SUPPORTED_DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")
# transformers' DeepSeek-V2/V3 build the latent's RMSNorm with the class default, not with config.rms_norm_eps.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def hfext_config_from_deepseek(source_config) -> HfExtConfig:
    """The `HfExtConfig` computing what a dense DeepSeek-V2/V3 model with `source_config` computes."""
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED_DEEPSEEK_FAMILIES:
        raise ValueError(
            f"from_deepseek cannot convert model_type={model_type!r}; supported: {list(SUPPORTED_DEEPSEEK_FAMILIES)} "
            "(for Llama-family checkpoints use from_llama, or to_mla to convert them to MLA)."
        )
    n = source_config.num_hidden_layers
    dense_layers = source_config.first_k_dense_replace or 0
    if dense_layers < n:
        raise ValueError(
            f"from_deepseek supports checkpoints whose every layer has a dense MLP (first_k_dense_replace >= "
            f"num_hidden_layers = {n}); this one has first_k_dense_replace={dense_layers}, so layers "
            f"{dense_layers}..{n - 1} are mixture-of-experts, which the HfExt family does not implement."
        )
    if source_config.attention_bias:
        raise ValueError("from_deepseek supports attention_bias=False (every released DeepSeek-V2/V3 checkpoint); "
                         "got attention_bias=True.")
    q_lora_rank = source_config.q_lora_rank or None  # some configs write 0 for "no query compression"
    return HfExtConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=source_config.num_attention_heads,
        # The rotary table is computed for the rotary width, as DeepseekV3Config does (head_dim = qk_rope_head_dim).
        head_dim=source_config.qk_rope_head_dim,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=source_config.initializer_range,
        rms_norm_eps=source_config.rms_norm_eps,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        rope_parameters=dict(source_config.rope_parameters),
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        attention_dropout=float(source_config.attention_dropout or 0.0),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        attention_types=["mla"] * n,
        kv_lora_rank=source_config.kv_lora_rank,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=source_config.qk_nope_head_dim,
        qk_rope_head_dim=source_config.qk_rope_head_dim,
        v_head_dim=source_config.v_head_dim,
        # DeepSeek-V2 rotates interleaved pairs as complex numbers; V3 says which layout its weights use.
        rope_interleave=bool(getattr(source_config, "rope_interleave", True)),
        kv_latent_norm_eps=DEEPSEEK_LATENT_NORM_EPS,
    )


def from_deepseek(model_or_path: PreTrainedModel | str | os.PathLike, **from_pretrained_kwargs) -> HfExtForCausalLM:
    """Turn a dense DeepSeek-V2/V3-style causal LM into an `HfExtForCausalLM` with the same logits.

    Args:
        model_or_path: a loaded `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM` whose layers all have dense MLPs
            (`first_k_dense_replace >= num_hidden_layers`; its tensors are handed over, do not keep using it), or
            a path / Hub id loaded with `AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained_kwargs)`.

    Returns:
        An `HfExtForCausalLM` in eval mode with MLA layers whose cache holds the latent and the rotary key only,
        decoding in the absorbed form.

    Raises:
        ValueError: for other model types, mixture-of-experts layers or attention biases.

    Example:
        >>> import torch, hf_ext
        >>> from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        >>> config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
        ...     v_head_dim=8, first_k_dense_replace=2)
        >>> model = hf_ext.convert.from_deepseek(DeepseekV3ForCausalLM(config))
        >>> model.config.attention_types
        ['mla', 'mla']
    """
    source = load_source(model_or_path, from_pretrained_kwargs)
    return build_hfext(hfext_config_from_deepseek(source.config), source.state_dict(), source)
