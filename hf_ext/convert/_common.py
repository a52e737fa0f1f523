"""What every converter into the HfExt family does: load the source, then build the HfExt model around its tensors."""

import os

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..models.hfext import HfExtConfig, HfExtForCausalLM
from ..models.hfext.modeling_hfext import HfExtRotaryEmbedding


def load_source(model_or_path, from_pretrained_kwargs: dict) -> PreTrainedModel:
    """A loaded model as it is, or `AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)`."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return AutoModelForCausalLM.from_pretrained(model_or_path, **from_pretrained_kwargs)
    if isinstance(model_or_path, PreTrainedModel):
        if from_pretrained_kwargs:
            raise TypeError(f"from_pretrained keyword arguments {sorted(from_pretrained_kwargs)} only apply to a path.")
        return model_or_path
    raise TypeError(
        f"`model_or_path` must be a transformers PreTrainedModel or a path, got {type(model_or_path).__name__}."
    )


def build_hfext(config: HfExtConfig, state_dict: dict, source: PreTrainedModel) -> HfExtForCausalLM:
    """An `HfExtForCausalLM` that takes `state_dict`'s tensors (moved, not copied: built on meta, loaded with
    `assign=True`), in eval mode, with the source's dtype, device, generation config and attention implementation."""
    parameter = next(source.parameters())
    config.dtype = parameter.dtype
    with torch.device("meta"):
        model = HfExtForCausalLM(config)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"The HfExt conversion of a {source.config.model_type} checkpoint does not match: "
            f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}."
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rotary tables are non-persistent buffers, still on meta: compute them for real.
    model.model.rotary_emb = HfExtRotaryEmbedding(config).to(parameter.device)
    model.generation_config = source.generation_config
    model.set_attn_implementation(source.config._attn_implementation or "sdpa")
    return model.eval()
