"""The models of the ReRoPE speed benchmark: a Llama with SmolLM2-135M's attention shapes behind every attention
implementation (sdpa, hfx_rerope, the reference patch's dense two-matrix ReRoPE written here) and its HfExt
conversion, the check that they compute the same logits, and greedy decoding from a prefilled cache."""

import copy
import math

import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_ext  # noqa: F401  (registers hfx_rerope)
from hf_ext.convert import from_llama

DENSE = "bench_dense_rerope"
LOGIT_TOLERANCE = 1e-4

# SmolLM2-135M's shapes (its config.json), 4 of its 30 layers.
MODEL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
         "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
ROPE_THETA = 100000.0


# ---------------------------------------------------------------------------------------------------------------
# The dense reference: the quadratic algorithm of the reference patch, as an attention implementation


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R_p x for x [B, H, L, D] in the rotate-half layout, p = positions [L] (any sign)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def dense_rerope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """ReRoPE the way the reference patch computes it: two full L×L logit matrices and a per-element select.

    transformers hands over queries and keys already rotated at their own positions (R_i q, R_j k), which is a1's
    input as it is. a2 needs R_w q and the un-rotated k: rotating by w − i and by −j gets there (R_a R_b = R_{a+b}).
    Batch 1 without padding is assumed (positions 0 … Lk−1, queries the last Lq of them), which is all we time.
    """
    config = module.config
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError(f"{DENSE} implements plain RoPE frequencies only.")
    window = config.rerope_window
    scaling = module.scaling if scaling is None else scaling
    q_len, k_len, head_dim = query.shape[2], key.shape[2], query.shape[3]
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2) / head_dim)
    key_positions = torch.arange(k_len)
    query_positions = key_positions[k_len - q_len:]
    if getattr(config, "logn_scaling", True):  # same rule as hfx_rerope: max(1, log(p + 1) / log N)
        training_length = getattr(config, "logn_training_length", None) or config.max_position_embeddings
        factor = (torch.log(query_positions + 1.0) / math.log(training_length)).clamp(min=1.0)
        query = query * factor[:, None]
    # Grouped-query attention: the patch repeats the key/value heads before the products.
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    query_far = _rotate(query, window - query_positions, inv_freq)
    key_raw = _rotate(key, -key_positions, inv_freq)
    near_logits = query @ key.transpose(-1, -2)  # a1: [B, H, Lq, Lk]
    far_logits = query_far @ key_raw.transpose(-1, -2)  # a2: [B, H, Lq, Lk]
    near = (query_positions[:, None] - key_positions[None, :]).abs() < window
    logits = torch.where(near, near_logits, far_logits)
    # The patch keeps a1 and a2 alive to the end of its forward; dropping them here makes our dense peak 3 matrices
    # instead of 4, i.e. the reference as run here is, if anything, kinder than the original.
    del near_logits, far_logits
    logits.mul_(scaling)
    if attention_mask is not None:  # eager_mask: 0 where allowed, the dtype's minimum elsewhere ([B, 1, Lq, Lk])
        logits.add_(attention_mask)
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    del logits
    return (probabilities @ value).transpose(1, 2).contiguous(), None


def register_dense_reference() -> None:
    AttentionInterface.register(DENSE, dense_rerope_attention)
    AttentionMaskInterface.register(DENSE, eager_mask)  # the additive float causal mask the eager patch received


def dense_peak_bytes(length: int, heads: int, batch: int = 1) -> int:
    """Estimated peak of one dense pass: a1, a2 and the selected logits (B·H·L² fp32 each) live at once, plus the
    boolean window mask and the additive causal mask with its boolean source (L² each, 1 + 4 + 1 bytes)."""
    return 3 * batch * heads * length * length * 4 + length * length * (1 + 4 + 1)


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_models(seed: int = 0, shapes: dict = MODEL) -> dict[str, torch.nn.Module]:
    """The same random weights behind every method: Llama (``shapes``: LlamaConfig arguments) with sdpa /
    hfx_rerope / the dense reference, and the HfExt conversion with rerope_mode "off" and "rerope"."""
    register_dense_reference()
    torch.manual_seed(seed)
    config = LlamaConfig(**shapes, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         attn_implementation="sdpa")
    sdpa = LlamaForCausalLM(config).to(torch.float32).eval()
    models = {"sdpa": sdpa}
    for name in ("hfx_rerope", DENSE):
        model = copy.deepcopy(sdpa)
        model.set_attn_implementation(name)
        model.config.logn_scaling = True  # read at every call by both ReRoPE implementations
        models[name] = model
    # from_llama takes over the tensors of what it gets, hence the copies.
    models["hfext_off"] = from_llama(copy.deepcopy(sdpa)).eval()
    models["hfext_rerope"] = from_llama(copy.deepcopy(sdpa)).eval()
    models["hfext_rerope"].config.rerope_mode = "rerope"
    return models


def set_window(models: dict, window: int) -> None:
    """The ReRoPE window of every model (a config attribute, read at each call)."""
    for model in models.values():
        model.config.rerope_window = window


# ---------------------------------------------------------------------------------------------------------------
# Checks and decoding


def validate(models: dict, length: int, window: int, logn_length: int) -> dict:
    """Both ReRoPE implementations and the HfExt path must compute the same logits, or the timings compare
    different things. A short length with w < L and a small log-n training length exercises every branch."""
    vocab = models["sdpa"].config.vocab_size
    ids = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(2))
    set_window(models, window)
    for name in ("hfx_rerope", DENSE):
        models[name].config.logn_training_length = logn_length
    logits = {name: models[name](input_ids=ids, use_cache=False).logits
              for name in ("sdpa", "hfx_rerope", DENSE)}
    dense_diff = (logits[DENSE] - logits["hfx_rerope"]).abs().max().item()
    # HfExt's ReRoPE (keys cached for the far product) against hfx_rerope on the Llama, both without log-n.
    models["hfx_rerope"].config.logn_scaling = False
    rerope_no_logn = models["hfx_rerope"](input_ids=ids, use_cache=False).logits
    hfext_rerope = models["hfext_rerope"](input_ids=ids, use_cache=False).logits
    hfext_diff = (hfext_rerope - rerope_no_logn).abs().max().item()
    models["hfx_rerope"].config.logn_scaling = True
    for name in ("hfx_rerope", DENSE):
        models[name].config.logn_training_length = None  # back to max_position_embeddings
    checks = {
        "validation": f"L={length}, w={window}, logn_training_length={logn_length}",
        "max_abs_logit_diff_dense_vs_hfx_rerope": dense_diff,
        "max_abs_logit_diff_hfext_rerope_vs_hfx_rerope_without_logn": hfext_diff,
        # Not a tolerance: shows that w < L changes the result, i.e. that the ReRoPE path really ran.
        "max_abs_logit_diff_hfx_rerope_vs_sdpa": (logits["hfx_rerope"] - logits["sdpa"]).abs().max().item(),
        "logit_tolerance": LOGIT_TOLERANCE,
    }
    for name in ("max_abs_logit_diff_dense_vs_hfx_rerope",
                 "max_abs_logit_diff_hfext_rerope_vs_hfx_rerope_without_logn"):
        if not checks[name] <= LOGIT_TOLERANCE:
            raise AssertionError(f"{name} = {checks[name]:.3g} > {LOGIT_TOLERANCE}: {checks}")
    return checks


class Decoder:
    """A prompt prefilled once into a cache; each call decodes `steps` greedy tokens from that same state."""

    def __init__(self, model, prompt_ids, steps: int):
        self.model, self.steps, self.context = model, steps, prompt_ids.shape[1]
        self.cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.first_token = logits[:, -1:].argmax(-1)

    def __call__(self) -> torch.Tensor:
        # Cropping returns views (no copy): every call starts from the prompt's cache, as in a fresh generation.
        extra = self.cache.get_seq_length() - self.context
        if extra:
            self.cache.crop(-extra)
        token, tokens = self.first_token, []
        for _ in range(self.steps):
            logits = self.model(input_ids=token, past_key_values=self.cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        return torch.cat(tokens, dim=1)
