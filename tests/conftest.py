import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_ext  # noqa: E402


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the name the installed transformers has (renamed in 5.23)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def merged_qwen2_vl_tables(cos: torch.Tensor, sin: torch.Tensor, mrope_section) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's rotary tables [batch, seq, dim] with the sections of the three axes merged. transformers before
    5.17 return one table per axis [3, batch, seq, dim] and merge them in `apply_multimodal_rotary_pos_emb`."""
    if cos.dim() == 3:
        return cos, sin
    sections = list(mrope_section) * 2

    def merge(table):
        return torch.cat([part[i % 3] for i, part in enumerate(table.split(sections, dim=-1))], dim=-1)

    return merge(cos), merge(sin)


def tiny_config(**overrides) -> hf_ext.HfExtConfig:
    """A 3-layer HfExt config small enough for exact CPU checks."""
    settings = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    settings.update(overrides)
    return hf_ext.HfExtConfig(**settings)


def hybrid_config(**overrides) -> hf_ext.HfExtConfig:
    """Every per-layer feature at once: sliding RoPE layers, a full NoPE layer with log-n scaling."""
    settings = dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=5,
        position_encodings=["rope", "none", "rope"],
        logn_scaling=[False, True, False],
        logn_training_length=8,
    )
    settings.update(overrides)
    return tiny_config(**settings)


def decode_step_gap(model, tokens: torch.Tensor, n: int) -> float:
    """max |Δlogit| between the last position of a full prefill and prefill of `n` tokens plus one cached step.

    Row 1 is left-padded by two tokens; positions count real tokens, as `generate` does.
    """
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(tokens, attention_mask=mask, position_ids=positions).logits[:, -1]
    prefix = model(tokens[:, :n], attention_mask=mask[:, :n], position_ids=positions[:, :n], use_cache=True)
    step = model(tokens[:, n:], attention_mask=mask, position_ids=positions[:, n:],
                 past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    return (full - step).abs().max().item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
