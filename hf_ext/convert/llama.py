"""Convert a Llama-family checkpoint (Llama, SmolLM, Mistral, Qwen2, Qwen3) into an `HfExtForCausalLM`.

The HfExt decoder uses the same parameter names as these models, so conversion is a config translation plus a
parameter hand-over: tensors are moved, not copied (the new model is built on the meta device and takes the source
tensors with `assign=True`), so converting needs no second copy of the weights in memory.
"""

import os

from transformers import PreTrainedModel

from ..models.hfext import HfExtConfig, HfExtForCausalLM
from ._common import build_hfext, load_source

# model_type -> how its attention projections carry biases and whether heads are normalised.
SUPPORTED_LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _attention_options(source_config) -> dict:
    model_type = source_config.model_type
    if model_type == "llama":
        bias = bool(getattr(source_config, "attention_bias", False))
        return {"attention_bias": bias, "attention_output_bias": bias, "mlp_bias": bool(source_config.mlp_bias)}
    if model_type == "mistral":
        return {"attention_bias": False, "attention_output_bias": False}
    if model_type == "qwen2":  # biases on q/k/v only, hard-wired in Qwen2Attention
        return {"attention_bias": True, "attention_output_bias": False}
    # qwen3: per-head RMSNorm on queries and keys; `attention_bias` covers all four projections
    bias = bool(getattr(source_config, "attention_bias", False))
    return {"attention_bias": bias, "attention_output_bias": bias, "qk_norm": True}


def _layer_options(source_config) -> dict:
    """Sliding-window layout: Mistral slides on every layer, Qwen2/3 list their layer types."""
    window = getattr(source_config, "sliding_window", None)
    n = source_config.num_hidden_layers
    if source_config.model_type == "mistral":
        kinds = ["sliding_attention" if window else "full_attention"] * n
    else:
        kinds = list(getattr(source_config, "layer_types", None) or ["full_attention"] * n)
    return {"layer_types": kinds, "sliding_window": window if "sliding_attention" in kinds else None}


def hfext_config_from_llama(source_config) -> HfExtConfig:
    """The `HfExtConfig` computing what `source_config`'s model computes."""
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED_LLAMA_FAMILIES:
        raise ValueError(
            f"from_llama cannot convert model_type={model_type!r}; supported families: "
            f"{list(SUPPORTED_LLAMA_FAMILIES)} (SmolLM checkpoints are model_type 'llama')."
        )
    rope = dict(source_config.rope_parameters or {})
    if rope and "rope_type" not in rope:
        raise ValueError(
            f"from_llama needs one global `rope_parameters` dict with a `rope_type`; got per-layer-type rotary "
            f"parameters {sorted(rope)}, which the HfExt family does not support."
        )
    partial = rope.get("partial_rotary_factor", getattr(source_config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise ValueError(f"from_llama supports full rotary heads only; got partial_rotary_factor={partial}.")
    num_heads = source_config.num_attention_heads
    return HfExtConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=source_config.num_key_value_heads or num_heads,
        head_dim=getattr(source_config, "head_dim", None) or source_config.hidden_size // num_heads,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=source_config.initializer_range,
        rms_norm_eps=source_config.rms_norm_eps,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        rope_parameters=rope,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        attention_dropout=float(getattr(source_config, "attention_dropout", 0.0) or 0.0),
        **_attention_options(source_config),
        **_layer_options(source_config),
    )


def from_llama(model_or_path: PreTrainedModel | str | os.PathLike, **from_pretrained_kwargs) -> HfExtForCausalLM:
    """Turn a Llama-family causal LM into an `HfExtForCausalLM` with the same logits.

    Args:
        model_or_path: a loaded `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` / `Qwen3ForCausalLM`
            (its tensors are handed over to the new model; do not keep using the source model), or a path / Hub id
            loaded with `AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained_kwargs)`
            (e.g. `gguf_file=...`).

    Returns:
        An `HfExtForCausalLM` in eval mode, on the source's device and dtype, with the source's generation config.

    Example:
        >>> import hf_ext
        >>> model = hf_ext.convert.from_llama("HuggingFaceTB/SmolLM2-135M")       # doctest: +SKIP
        >>> model.save_pretrained("smollm2-hfext")                                  # doctest: +SKIP
    """
    source = load_source(model_or_path, from_pretrained_kwargs)
    return build_hfext(hfext_config_from_llama(source.config), source.state_dict(), source)
