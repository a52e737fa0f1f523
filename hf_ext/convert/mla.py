"""Convert a grouped-query-attention model (Llama family or HfExt) into MLA: `to_mla`.

Method (in the spirit of MHA2MLA and TransMLA), per layer, with n_kv key/value heads of width d, group size
m = heads / n_kv:

1. Partial RoPE. Keep the first `qk_rope_head_dim / 2` rotary frequencies (the highest ones) of every query and key
   head; their dimensions become the decoupled rotary query/key. The remaining d − qk_rope_head_dim dimensions
   become "nope" dimensions, which are no longer rotated (the only approximation of this step). Each KV head's rotary
   part is kept as it is: one rotary key per KV group (`mla_rope_key_heads = n_kv`).
2. Joint low-rank factorisation of the nope keys and the values: the stacked projection A = [W_K,nope; W_V]
   (n_kv·(d_nope + d) rows, with its bias as an extra column) is factored as A ≈ W_UP · W_DOWN with rank
   `kv_lora_rank`; W_DOWN is the latent projection and W_UP, repeated for the m heads of each group, is `kv_b_proj`.
   With `calibration_input_ids`, the factorisation minimises the error on the layer's real inputs X
   (‖(A − W_UP W_DOWN) X‖, via the Cholesky factor of XᵀX) instead of on the weights.

The exact setting, `qk_rope_head_dim = head_dim` and `kv_lora_rank = n_kv · head_dim` (the defaults), rotates every
dimension and truncates nothing: W_DOWN = W_V and W_UP selects each head's value block, so the converted model
computes what the source computes — with the cache of the source and the absorbed decode path of MLA. Smaller
settings trade accuracy for cache: per token and layer the cache holds `kv_lora_rank + n_kv · qk_rope_head_dim`
elements instead of 2 · n_kv · head_dim.
"""

import os

import torch
from transformers import DeepseekV3ForCausalLM, PreTrainedModel

from ..models.hfext import HfExtConfig, HfExtForCausalLM
from ..models.hfext.configuration_hfext import _describe
from ..models.hfext.mla_hfext import kept_rotary_columns
from ._common import build_hfext, load_source
from .llama import from_llama

OUTPUT_FORMATS = ("hfext", "deepseek")


def _check_settings(config: HfExtConfig, kv_lora_rank, qk_rope_head_dim) -> tuple[int, int]:
    d, n_kv = config.head_dim, config.num_key_value_heads
    if config.qk_norm:
        raise ValueError("to_mla cannot convert models with per-head query/key RMSNorm (qk_norm=True, Qwen3): the norm "
                         "of the up-projected keys cannot be folded into a latent.")
    if qk_rope_head_dim is None:
        qk_rope_head_dim = d
    if not isinstance(qk_rope_head_dim, int) or isinstance(qk_rope_head_dim, bool) or qk_rope_head_dim % 2 \
            or not 0 <= qk_rope_head_dim <= d:
        raise ValueError(f"`qk_rope_head_dim` must be an even integer in [0, head_dim={d}] (rotary dimensions kept "
                         f"per head), got {_describe(qk_rope_head_dim)}.")
    rows = n_kv * (2 * d - qk_rope_head_dim)
    max_rank = min(rows, config.hidden_size)
    if kv_lora_rank is None:
        kv_lora_rank = max_rank
    if not isinstance(kv_lora_rank, int) or isinstance(kv_lora_rank, bool) or not 1 <= kv_lora_rank <= max_rank:
        raise ValueError(
            f"`kv_lora_rank` must be an integer in [1, {max_rank}]: the latent factors the {rows} stacked nope-key and "
            f"value rows of each layer (n_kv={n_kv} × (2·head_dim − qk_rope_head_dim)) and cannot exceed "
            f"hidden_size={config.hidden_size}; got {_describe(kv_lora_rank)}."
        )
    return kv_lora_rank, qk_rope_head_dim


def _rotary_rows(head_dim: int, qk_rope_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within a rotate-half head: the rows the MLA layer keeps rotary (the same columns it reads from its rotary
    tables), and the rest."""
    rope = kept_rotary_columns(head_dim, qk_rope_head_dim)
    is_rope = torch.zeros(head_dim, dtype=torch.bool)
    is_rope[rope] = True
    return rope, torch.arange(head_dim)[~is_rope]


def for_each_attention_input(model: HfExtForCausalLM, input_ids: torch.Tensor, consume) -> None:
    """One no-grad forward pass over `input_ids`, calling `consume(layer_index, x)` with every layer's attention
    input x [tokens, hidden]."""
    def hook(index):
        def record(module, args, kwargs):
            consume(index, kwargs["hidden_states"].detach().reshape(-1, kwargs["hidden_states"].shape[-1]))
        return record

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)  # only the inputs matter
    finally:
        for handle in handles:
            handle.remove()


def _layer_inputs_gram(model: HfExtForCausalLM, input_ids: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
    """Per layer, XᵀX (float64) of the attention inputs X over `input_ids`, with a column of ones if biased."""
    grams = [None] * len(model.model.layers)

    def accumulate(index, x):
        x = x.double()
        if with_bias:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        grams[index] = x.T @ x + (0 if grams[index] is None else grams[index])

    for_each_attention_input(model, input_ids, accumulate)
    return grams


def _factor(stacked: torch.Tensor, rank: int, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """stacked [rows, cols] ≈ up [rows, rank] @ down [rank, cols], best in ‖(stacked − up·down) X‖ for XᵀX = gram
    (plain weight-space SVD without one). Float64."""
    if rank == stacked.shape[0]:  # nothing to truncate: the latent is the stacked projection itself
        return torch.eye(rank, dtype=stacked.dtype, device=stacked.device), stacked
    if gram is None:
        u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        return u[:, :rank], s[:rank, None] * vh[:rank]
    # Cholesky of XᵀX with a small ridge (directions the data never uses must not blow up the inverse).
    ridge = 1e-6 * gram.diagonal().mean()
    chol = torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    u, s, vh = torch.linalg.svd(stacked @ chol, full_matrices=False)
    # down · L = S_k V_kᵀ, so that up · down · L is the best rank-k approximation of stacked · L.
    down = torch.linalg.solve_triangular(chol, s[:rank, None] * vh[:rank], upper=False, left=False)
    return u[:, :rank], down


def _convert_layer(attn, config: HfExtConfig, rank: int, rope_dim: int, gram) -> dict:
    """The MLA tensors of one GQA layer (float64, to be cast by the caller)."""
    h, n_kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    m = h // n_kv
    rope_rows, nope_rows = _rotary_rows(d, rope_dim)
    hidden = config.hidden_size

    def heads(linear, count):  # weight [count, d, hidden] and bias [count, d] (or None)
        weight = linear.weight.detach().double().view(count, d, hidden)
        bias = linear.bias.detach().double().view(count, d) if linear.bias is not None else None
        return weight, bias

    wq, bq = heads(attn.q_proj, h)
    wk, bk = heads(attn.k_proj, n_kv)
    wv, bv = heads(attn.v_proj, n_kv)
    order = torch.cat([nope_rows, rope_rows])
    out = {"q_proj.weight": wq[:, order].reshape(-1, hidden)}
    if bq is not None:
        out["q_proj.bias"] = bq[:, order].reshape(-1)

    stacked = torch.cat([wk[:, nope_rows].reshape(-1, hidden), wv.reshape(-1, hidden)])
    if bk is not None:
        stacked = torch.cat([stacked, torch.cat([bk[:, nope_rows].reshape(-1), bv.reshape(-1)])[:, None]], dim=1)
    up, down = _factor(stacked, rank, gram)
    d_nope = d - rope_dim
    up_k = up[: n_kv * d_nope].view(n_kv, d_nope, rank)
    up_v = up[n_kv * d_nope:].view(n_kv, d, rank)
    per_head = torch.cat([up_k, up_v], dim=1).repeat_interleave(m, dim=0)  # head i reads its group's block
    out["kv_b_proj.weight"] = per_head.reshape(-1, rank)
    rope_keys = wk[:, rope_rows].reshape(-1, hidden)
    out["kv_a_proj_with_mqa.weight"] = torch.cat([down[:, :hidden], rope_keys])
    if bk is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([down[:, hidden], bk[:, rope_rows].reshape(-1)])
    out["o_proj.weight"] = attn.o_proj.weight.detach().double()
    if attn.o_proj.bias is not None:
        out["o_proj.bias"] = attn.o_proj.bias.detach().double()
    return out


def to_mla(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    calibration_input_ids: torch.Tensor | None = None,
    output_format: str = "hfext",
    **from_pretrained_kwargs,
) -> HfExtForCausalLM | DeepseekV3ForCausalLM:
    """Convert a grouped-query-attention causal LM into MLA: an `HfExtForCausalLM` whose every layer is MLA, or a
    DeepSeek-V3 checkpoint (`output_format="deepseek"`).

    Args:
        model_or_path: a Llama-family model (Llama, SmolLM, Mistral, Qwen2), an `HfExtForCausalLM` with GQA layers,
            or a path loaded with `AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)`. The source
            is not modified.
        kv_lora_rank: width of the cached latent that factors the nope keys and values of each layer. Defaults to
            n_kv · (2·head_dim − qk_rope_head_dim) capped at hidden_size (no truncation).
        qk_rope_head_dim: rotary dimensions kept per head (even, ≤ head_dim; the highest frequencies are kept), or
            with `output_format="deepseek"` the width of the one shared rotary key (even, 2..head_dim). Defaults
            to head_dim: every kept frequency keeps its rotation.
        calibration_input_ids: token ids [batch, seq] whose attention inputs weight the factorisation (activation-
            aware); without them the factorisation is a plain SVD of the weights. With `output_format="deepseek"`
            they also fit the shared rotary key and the latent norm, and are strongly advised.
        output_format: `"hfext"` (default) or `"deepseek"`. `"deepseek"` writes DeepSeek-V3's layout, which
            transformers' `DeepseekV3ForCausalLM` loads as it is (the layout DeepSeek-serving engines read):
            one rotary key shared by all heads, an RMSNorm on the latent, interleaved rotary pairs, dense MLPs,
            untied embeddings. The shared key and the latent norm are approximations unless the source has one KV
            head and `kv_lora_rank = hidden_size` (see `hf_ext.convert.deepseek_export`); the cache holds
            `kv_lora_rank + qk_rope_head_dim` elements per token and layer. `kv_lora_rank` defaults to
            2·n_kv·head_dim − qk_rope_head_dim (capped at hidden_size), the size of the source's cache with the
            default `qk_rope_head_dim`; with calibration one of its rows evens out the latent norm and carries no key
            or value. Rope scaling (linear, llama3) is exact in transformers but read as YaRN by vLLM and SGLang:
            a warning says so.

    Returns:
        With `output_format="hfext"`, an `HfExtForCausalLM` in eval mode with the source's dtype and device. With
        both defaults it reproduces the source's logits (to float rounding); the KV cache then holds
        kv_lora_rank + n_kv·qk_rope_head_dim elements per token and layer. With `"deepseek"`, a
        `DeepseekV3ForCausalLM` in eval mode, with the source's dtype and device.

    Example:
        >>> import torch, hf_ext
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> source = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
        >>> exact = hf_ext.convert.to_mla(source)
        >>> ids = torch.tensor([[1, 5, 9, 13]])
        >>> bool(torch.allclose(exact(ids).logits, source(ids).logits, atol=1e-4))
        True
        >>> small = hf_ext.convert.to_mla(source, kv_lora_rank=16, qk_rope_head_dim=8)
        >>> hf_ext.kv_cache_bytes_per_token(small.config, dtype=torch.bfloat16)   # (16 + 2·8) · 2 layers · 2 bytes
        128
    """
    source = load_source(model_or_path, from_pretrained_kwargs)
    if not isinstance(source, HfExtForCausalLM):
        source = from_llama(source)  # shares the caller's tensors; only read here, and cloned below where kept
    config = source.config
    if any(kind != "gqa" for kind in config.attention_types):
        raise ValueError(f"to_mla converts grouped-query-attention layers; this model's attention_types are "
                         f"{config.attention_types}.")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"`output_format` must be one of {list(OUTPUT_FORMATS)}, got {_describe(output_format)}.")
    if output_format == "deepseek":
        from .deepseek_export import export_deepseek  # it imports this module

        return export_deepseek(source, kv_lora_rank, qk_rope_head_dim, calibration_input_ids)
    rank, rope_dim = _check_settings(config, kv_lora_rank, qk_rope_head_dim)
    grams = [None] * config.num_hidden_layers
    if calibration_input_ids is not None:
        grams = _layer_inputs_gram(source, calibration_input_ids, with_bias=config.attention_bias)

    new_config = HfExtConfig(**{
        **config.to_diff_dict(),
        "attention_types": ["mla"] * config.num_hidden_layers,
        "kv_lora_rank": rank,
        "q_lora_rank": None,
        "qk_nope_head_dim": config.head_dim - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": config.head_dim,
        "mla_rope_key_heads": config.num_key_value_heads,
        "kv_latent_norm": False,
        "rope_interleave": False,
    })
    dtype = next(source.parameters()).dtype
    # Tensors kept as they are get copied (the source must stay intact); the attention tensors are new anyway.
    state_dict = {name: tensor.clone() for name, tensor in source.state_dict().items() if ".self_attn." not in name}
    for index, layer in enumerate(source.model.layers):
        for name, tensor in _convert_layer(layer.self_attn, config, rank, rope_dim, grams[index]).items():
            state_dict[f"model.layers.{index}.self_attn.{name}"] = tensor.to(dtype).contiguous()
    return build_hfext(new_config, state_dict, source)
