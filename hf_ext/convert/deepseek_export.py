"""GQA → MLA in DeepSeek's own checkpoint format: what `to_mla(..., output_format="deepseek")` builds.

A DeepSeek-V2/V3 attention layer differs from the HfExt MLA layer `to_mla` writes by default in three ways, and
each costs something when a GQA model is converted:

1. **One rotary key shared by every head** (instead of one per KV group). Read each kept rotary pair of key
   head g as a complex number z_g = k_re + i·k_im, which the rotation multiplies by e^{iθ}. Per frequency, the
   shared pair is s = Σ_g conj(u_g)·z_g for the unit complex vector u with the most energy E|s|² over the
   calibration inputs (the top eigenvector of the heads' Hermitian matrix E[z_g conj(z_g')]). Complex mixing
   commutes with the rotation, so s is rotated exactly and head j of group g reads u_g·s through its query pair
   times conj(u_g). What s does not carry of each key head, z_g − u_g·s, moves to that head's non-rotary keys,
   where it is no longer rotated: the approximation of this step (in the spirit of TransMLA's RoRoPE,
   arXiv:2502.07864). With one KV head, or heads whose pairs differ only by a complex factor, nothing is left over.
2. **An RMSNorm on the cached latent** (`kv_a_layernorm`), which transformers' `DeepseekV3Attention` always
   applies: each token's latent is divided by its own RMS. The latent is scaled so that this RMS is 1 on average
   over the calibration tokens, and one latent row (`_add_stabiliser`) evens it out where it would be far from
   1; what spread is left is the approximation of this step. With `kv_lora_rank = hidden_size` the latent is the
   normalised hidden state itself (the input RMSNorm's weight moves into `kv_b_proj`), whose RMS is 1 for every
   token, and the step is exact up to the two norms' epsilons. An RMS near 1 also makes the norm's epsilon
   immaterial, which matters because transformers builds it with 1e-6 and vLLM/SGLang with `rms_norm_eps`.
3. **Interleaved rotary pairs and a rotary table of width `qk_rope_head_dim`.** The kept rotary rows are
   reordered as (x0, x1), (x2, x3), … (`rope_interleave=True`, what DeepSeek checkpoints and the serving engines
   use), and `rope_theta` becomes θ^(qk_rope_head_dim / head_dim), so that the table of the narrower width has
   the source's first `qk_rope_head_dim / 2` frequencies. The softmax scale 1/√(qk_nope_head_dim +
   qk_rope_head_dim) is folded into the query weights. Both are exact.

Steps 1 and 2 fit statistics of the attention inputs, so pass `calibration_input_ids`: without them the mixing
assumes isotropic normalised hidden states and no stabiliser row is fitted, which on a real model is far worse
(`benchmarks/mla_conversion_quality.py` measures both).

The result is a `DeepseekV3ForCausalLM` with dense MLPs in every layer (`first_k_dense_replace =
num_hidden_layers`), untied embeddings and no attention biases, which transformers loads with its own classes.
"""

import copy
import math
import warnings

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ..models.hfext import HfExtConfig, HfExtForCausalLM
from ..models.hfext.configuration_hfext import _describe
from .mla import _factor, _rotary_rows, for_each_attention_input

# Latent rows that only even out the latent's norm over tokens (see `_add_stabiliser`); more did not help on SmolLM2.
STABILISER_ROWS = 1
EXPORTABLE_ROPE_TYPES = ("default", "linear", "llama3")  # their tables depend on the frequencies only


def check_exportable(config: HfExtConfig) -> None:
    """Refuse, naming the setting, a GQA model whose layers DeepSeek-V3's classes cannot express."""
    problems = []
    if config.qk_norm:
        problems.append("per-head query/key RMSNorm (qk_norm=True, Qwen3), which no latent can carry")
    if config.image_patch_size is not None:
        problems.append("image inputs (image_patch_size is set)")
    if config.attention_bias or config.attention_output_bias:
        problems.append("attention biases (attention_bias=True, e.g. Qwen2): DeepSeek-V3's q_proj has none")
    if config.mlp_bias:
        problems.append("MLP biases (mlp_bias=True)")
    if any(kind != "full_attention" for kind in config.layer_types):
        problems.append(f"sliding-window layers (layer_types {sorted(set(config.layer_types))})")
    if any(encoding != "rope" for encoding in config.position_encodings):
        problems.append(f"layers without rotary positions (position_encodings {sorted(set(config.position_encodings))})")
    if any(config.logn_scaling) or config.rerope_mode != "off":
        problems.append("log-n scaling or ReRoPE, which DeepSeek-V3's attention does not implement")
    if config.position_layout != "flatten":
        problems.append(f"position_layout={config.position_layout!r} (multimodal positions)")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") not in EXPORTABLE_ROPE_TYPES:
        problems.append(f"rope_type={rope.get('rope_type')!r}; exportable rope types are {list(EXPORTABLE_ROPE_TYPES)}")
    if (rope.get("partial_rotary_factor") or 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (only full rotary heads)")
    if problems:
        raise ValueError("to_mla(output_format='deepseek') cannot express this model in DeepSeek-V3's format: "
                         + "; ".join(problems) + ". Use output_format='hfext' instead.")


def deepseek_settings(config: HfExtConfig, kv_lora_rank, qk_rope_head_dim) -> tuple[int, int]:
    """Check and default (kv_lora_rank, qk_rope_head_dim) for the DeepSeek layout."""
    d, n_kv, hidden = config.head_dim, config.num_key_value_heads, config.hidden_size
    if qk_rope_head_dim is None:
        qk_rope_head_dim = d
    if not isinstance(qk_rope_head_dim, int) or isinstance(qk_rope_head_dim, bool) or qk_rope_head_dim % 2 \
            or not 2 <= qk_rope_head_dim <= d:
        raise ValueError(f"`qk_rope_head_dim` must be an even integer in [2, head_dim={d}] for "
                         f"output_format='deepseek' (the width of the shared rotary key), got "
                         f"{_describe(qk_rope_head_dim)}.")
    # Rank of the stacked non-rotary keys and values: n_kv·(d − r) kept nope rows, (n_kv − 1)·r leftover rotary
    # rows (one pair per frequency went to the shared key) and n_kv·d value rows.
    factor_rank = min(2 * n_kv * d - qk_rope_head_dim, hidden)
    if kv_lora_rank is None:
        kv_lora_rank = factor_rank
    if not isinstance(kv_lora_rank, int) or isinstance(kv_lora_rank, bool) \
            or not (1 <= kv_lora_rank <= factor_rank or kv_lora_rank == hidden):
        raise ValueError(
            f"`kv_lora_rank` must be an integer in [1, {factor_rank}] (the rank of each layer's non-rotary keys "
            f"and values, 2·n_kv·head_dim − qk_rope_head_dim capped at hidden_size) or hidden_size={hidden} (a "
            f"latent holding the whole normalised hidden state) for output_format='deepseek'; got "
            f"{_describe(kv_lora_rank)}."
        )
    return kv_lora_rank, qk_rope_head_dim


def layer_input_samples(model: HfExtForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention inputs X [tokens, hidden] over `input_ids`, in float32: tokens · hidden · 4 bytes per
    layer (the stabiliser fit needs each token, not only XᵀX)."""
    samples = [None] * len(model.model.layers)
    for_each_attention_input(model, input_ids, lambda index, x: samples.__setitem__(index, x.float()))
    return samples


def _shared_key_mixing(rotary_keys: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """rotary_keys [n_kv, 2, F, hidden] (the two halves of each kept pair) → u [F, n_kv] complex: per frequency,
    the unit complex mix of the key heads with the most energy E|Σ_g conj(u_g) z_g|², z_g = k_{g,re} + i·k_{g,im}."""
    z = torch.complex(rotary_keys[:, 0], rotary_keys[:, 1]).permute(1, 0, 2)  # [F, n_kv, hidden]
    energy = torch.einsum("fgh,hk,fjk->fgj", z, covariance.to(z.dtype), z.conj())  # E[z_g conj(z_j)]
    u = torch.linalg.eigh(energy).eigenvectors[..., -1]
    # A fixed global phase, for reproducibility: the largest entry made real and positive (never zero for a unit u).
    largest = u.gather(-1, u.abs().argmax(-1, keepdim=True))
    return u * (largest.conj() / largest.abs())


def _latent(stacked: torch.Tensor, rank: int, input_norm: torch.Tensor, gram, covariance: torch.Tensor,
            samples: torch.Tensor | None):
    """stacked [rows, hidden] ≈ up [rows, rank] @ RMSNorm(down @ x): (up, down), float64."""
    hidden = stacked.shape[1]
    if rank == hidden:  # the latent is the normalised hidden state x / w_in: RMS 1 for every token
        if not bool((input_norm != 0).all()):
            raise ValueError("kv_lora_rank = hidden_size needs every weight of the layers' input RMSNorm to be "
                             "nonzero (the latent divides by them); choose a smaller kv_lora_rank.")
        return stacked * input_norm, torch.diag(1 / input_norm)
    extra = min(STABILISER_ROWS, rank - 1) if samples is not None else 0
    up, down = _factor(stacked, rank - extra, gram)
    if extra:
        down, up = _add_stabiliser(down, up, samples, gram, extra)
    if samples is not None:
        scale = (samples @ down.T).pow(2).mean(-1).sqrt().mean()
    else:  # E[mean(c²)] over the inputs: the norm then divides by about 1
        scale = torch.sqrt(torch.einsum("rh,hk,rk->", down, covariance, down) / rank)
    return up * scale, down / scale


def _add_stabiliser(down, up, samples, gram, extra):
    """Append `extra` latent rows that no key or value reads (zero columns of `up`) and whose only job is to even
    out the latent's norm over tokens.

    The latent RMSNorm divides each token by the RMS of its latent. Tokens whose hidden state lies mostly outside
    the latent's subspace (on SmolLM2 the first token of every sequence, the attention sink: under half the others'
    RMS in 19 of 30 layers, down to 0.17) would come out several times too large and derail the attention. The added rows point where those
    tokens have much energy and the others little (the top generalised eigenvectors of (Σ_t deficit_t x_t x_tᵀ,
    Σ_t x_t x_tᵀ)), weighted by least squares so that ‖latent‖² is as even as possible over the samples.
    """
    base = (samples @ down.T).pow(2).sum(-1)  # ‖latent‖² per sample token
    deficit = (base.mean() - base).clamp_min(0)
    ridge = 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + ridge)
    weighted = samples.T @ (deficit[:, None] * samples)
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, weighted, upper=False).T,
                                             upper=False)  # L⁻¹ W L⁻ᵀ
    directions = torch.linalg.solve_triangular(chol.T, torch.linalg.eigh(whitened).eigenvectors[:, -extra:],
                                               upper=True)
    directions = directions / directions.norm(dim=0, keepdim=True)  # [hidden, extra]
    # least squares over the weights and the level T of Σ_t (base_t + Σ_j weight_j (a_j·x_t)² − T)², negative
    # weights then set to 0
    energy = (samples @ directions).pow(2)
    system = torch.cat([energy, -torch.ones_like(base)[:, None]], dim=1)
    weights = torch.linalg.lstsq(system, -base[:, None]).solution[:extra, 0].clamp_min(0)
    rows = weights.sqrt()[:, None] * directions.T
    return torch.cat([down, rows]), torch.cat([up, up.new_zeros(up.shape[0], extra)], dim=1)


def nope_width(config: HfExtConfig, rope_dim: int) -> int:
    """qk_nope_head_dim of the export: the source's unrotated dims, plus the leftover rotary ones when the shared
    key leaves some (more than one KV head)."""
    return config.head_dim - rope_dim + (rope_dim if config.num_key_value_heads > 1 else 0)


def export_layer(attn, input_norm: torch.Tensor, config: HfExtConfig, rank: int, rope_dim: int, gram,
                 covariance: torch.Tensor, samples=None) -> dict:
    """The DeepSeek-V3 attention tensors of one GQA layer (float64)."""
    h, n_kv, d, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    group_of_head = torch.arange(h) // (h // n_kv)
    frequencies = rope_dim // 2
    rope_rows, nope_rows = _rotary_rows(d, rope_dim)  # rope_rows: the F first halves, then the F second halves
    wq = attn.q_proj.weight.detach().double().view(h, d, hidden)
    wk = attn.k_proj.weight.detach().double().view(n_kv, d, hidden)
    wv = attn.v_proj.weight.detach().double().view(n_kv, d, hidden)

    rotary_keys = wk[:, rope_rows].view(n_kv, 2, frequencies, hidden)
    u = _shared_key_mixing(rotary_keys, covariance)  # [F, n_kv] complex
    z = torch.complex(rotary_keys[:, 0], rotary_keys[:, 1])  # [n_kv, F, hidden]
    shared = torch.einsum("fg,gfh->fh", u.conj(), z)  # [F, hidden]
    leftover = z - u.T[:, :, None] * shared  # what the shared pair does not carry, per head
    # Head j of group g meets u_g·shared: its query pair is multiplied by conj(u_g) (complex numbers commute
    # with the rotation).
    q = torch.complex(*wq[:, rope_rows].view(h, 2, frequencies, hidden).unbind(1)) * u.T.conj()[group_of_head][..., None]

    def interleaved(pairs):  # complex [..., F, hidden] → real [..., 2F, hidden] ordered (re0, im0), (re1, im1), ...
        return torch.stack([pairs.real, pairs.imag], dim=-2).reshape(*pairs.shape[:-2], 2 * frequencies, hidden)

    def halves(pairs):  # complex [..., F, hidden] → real [..., 2F, hidden] in rotate-half order (all re, all im)
        return torch.cat([pairs.real, pairs.imag], dim=-2)

    key_nope, query_nope = [wk[:, nope_rows]], [wq[:, nope_rows]]
    if n_kv > 1:  # the leftover rotary parts, now unrotated, meet the same query rows as before
        key_nope.append(halves(leftover))
        query_nope.append(wq[:, rope_rows])
    key_nope, query_nope = torch.cat(key_nope, dim=1), torch.cat(query_nope, dim=1)
    query_rope = interleaved(q)
    d_nope = nope_width(config, rope_dim)
    # DeepSeek divides scores by √(d_nope + rope_dim); the source by √head_dim.
    query = torch.cat([query_nope, query_rope], dim=1) * math.sqrt((d_nope + rope_dim) / d)

    stacked = torch.cat([key_nope.reshape(-1, hidden), wv.reshape(-1, hidden)])
    up, down = _latent(stacked, rank, input_norm, gram, covariance, samples)
    up_k, up_v = up[: n_kv * d_nope].view(n_kv, d_nope, rank), up[n_kv * d_nope:].view(n_kv, d, rank)
    per_head = torch.cat([up_k, up_v], dim=1)[group_of_head]  # head j reads its group's rows
    return {
        "q_proj.weight": query.reshape(-1, hidden),
        "kv_a_proj_with_mqa.weight": torch.cat([down, interleaved(shared)]),
        "kv_a_layernorm.weight": torch.ones(rank, dtype=torch.float64, device=down.device),
        "kv_b_proj.weight": per_head.reshape(-1, rank),
        "o_proj.weight": attn.o_proj.weight.detach().double(),
    }


def deepseek_config(config: HfExtConfig, rank: int, rope_dim: int) -> DeepseekV3Config:
    """The DeepSeek-V3 configuration of the export: every layer dense, one head per key/value (MLA)."""
    d, n = config.head_dim, config.num_hidden_layers
    rope_parameters = dict(config.rope_parameters)
    # A table of width rope_dim with this base has the source's first rope_dim / 2 frequencies θ^(-2i/d).
    rope_parameters["rope_theta"] = float(rope_parameters["rope_theta"]) ** (rope_dim / d)
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=n, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, first_k_dense_replace=n,
        kv_lora_rank=rank, q_lora_rank=None, qk_nope_head_dim=nope_width(config, rope_dim), qk_rope_head_dim=rope_dim, v_head_dim=d,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=False, rope_parameters=rope_parameters, rope_interleave=True, attention_bias=False,
        attention_dropout=float(config.attention_dropout or 0.0), num_nextn_predict_layers=0,
    )


def export_deepseek(source: HfExtForCausalLM, kv_lora_rank, qk_rope_head_dim, calibration_input_ids
                    ) -> DeepseekV3ForCausalLM:
    """`to_mla(source, ..., output_format="deepseek")` for a GQA `HfExtForCausalLM` (left intact)."""
    config = source.config
    check_exportable(config)
    rank, rope_dim = deepseek_settings(config, kv_lora_rank, qk_rope_head_dim)
    if calibration_input_ids is None and (config.num_key_value_heads > 1 or rank != config.hidden_size):
        warnings.warn("to_mla(output_format='deepseek') without calibration_input_ids fits the shared rotary key and "
                      "the latent norm blind (isotropic inputs assumed); pass a few hundred tokens of real text as "
                      "calibration_input_ids, or expect a much larger loss.", UserWarning, stacklevel=3)
    if (config.rope_parameters or {}).get("rope_type", "default") != "default":
        warnings.warn("DeepSeek-V3 exports with rope scaling are exact in transformers, but vLLM and SGLang read any "
                      "DeepSeek rope scaling as YaRN, so there the rotary frequencies would differ.", UserWarning,
                      stacklevel=3)
    samples = None if calibration_input_ids is None else layer_input_samples(source, calibration_input_ids)
    dtype, device = next(source.parameters()).dtype, next(source.parameters()).device
    state_dict = {name: tensor.clone() for name, tensor in source.state_dict().items() if ".self_attn." not in name}
    state_dict["lm_head.weight"] = source.get_output_embeddings().weight.detach().clone()  # untied
    for index, layer in enumerate(source.model.layers):
        input_norm = layer.input_layernorm.weight.detach().double()
        x = None if samples is None else samples[index].double()
        gram = None if x is None else x.T @ x
        # E[x xᵀ] of the attention inputs; without data, x = w_in ⊙ n with an isotropic n of RMS 1.
        covariance = torch.diag(input_norm**2) if x is None else gram / len(x)
        tensors = export_layer(layer.self_attn, input_norm, config, rank, rope_dim, gram, covariance, x)
        for name, tensor in tensors.items():
            state_dict[f"model.layers.{index}.self_attn.{name}"] = tensor.to(device=device, dtype=dtype).contiguous()

    new_config = deepseek_config(config, rank, rope_dim)
    new_config.dtype = dtype
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(new_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"The DeepSeek export does not match DeepseekV3ForCausalLM: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}.")
    # The rotary tables are non-persistent buffers, still on meta: compute them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(new_config).to(device)
    model.generation_config = copy.deepcopy(source.generation_config)
    model.set_attn_implementation(source.config._attn_implementation or "sdpa")
    return model.eval()

