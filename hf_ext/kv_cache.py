"""How many bytes a model's KV cache holds per token: `kv_cache_bytes_per_token`.

Per layer and token the cache holds 2·n_kv·head_dim elements for MHA/GQA (a key and a value per KV head),
and kv_lora_rank + g·qk_rope_head_dim for MLA (the latent and g rotary keys; DeepSeek has g = 1). transformers 5.x's
DeepSeek-V2/V3 models cache the latent too, so they count as MLA here.
"""

import torch
from transformers import PreTrainedConfig


def _elements_per_layer(config) -> list[int]:
    """Cache elements per token for each layer of `config`."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = config.num_hidden_layers
    if getattr(config, "model_type", None) == "hf_ext":
        gqa = 2 * config.num_key_value_heads * config.head_dim
        mla = (config.kv_lora_rank or 0) + config.mla_rope_key_heads * (config.qk_rope_head_dim or 0)
        return [mla if kind == "mla" else gqa for kind in config.attention_types]
    if getattr(config, "kv_lora_rank", None):  # DeepSeek-V2/V3 and other in-tree MLA models cache the latent
        return [config.kv_lora_rank + config.qk_rope_head_dim] * n_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return [2 * kv_heads * head_dim] * n_layers


def kv_cache_bytes_per_token(config: PreTrainedConfig, dtype: torch.dtype | None = None, per_layer: bool = False):
    """Bytes the KV cache of a model with `config` holds for every cached token.

    Args:
        config: an `HfExtConfig` (GQA and MLA layers), or a transformers decoder config (Llama, Qwen2, Mistral, …:
            MHA/GQA; DeepSeek-V2/V3: latent cache).
        dtype: element type of the cache; defaults to `config.dtype`, else float32.
        per_layer: return one number per layer instead of their sum.

    Sliding-window layers hold at most `sliding_window` tokens; the count here is per cached token.

    Example:
        >>> import torch, hf_ext
        >>> from transformers import LlamaConfig
        >>> gqa = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
        >>> hf_ext.kv_cache_bytes_per_token(gqa, dtype=torch.bfloat16)   # 2 · 3 · 64 · 30 layers · 2 bytes
        23040
    """
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be a torch.dtype, got {dtype!r}.")
    item_size = torch.empty((), dtype=dtype).element_size()
    sizes = [elements * item_size for elements in _elements_per_layer(config)]
    return sizes if per_layer else sum(sizes)
