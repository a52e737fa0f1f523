"""ReRoPE / Leaky ReRoPE / log-n for existing RoPE checkpoints: float64 oracle, degeneracies, cache consistency."""

import copy
import math
import warnings

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_ext  # noqa: F401  (registers the implementations)
from conftest import decode_step_gap
from hf_ext.models.hfext import rerope_hfext
from hf_ext.models.hfext.ops_hfext import rotate_half
from hf_ext.models.hfext.rerope_hfext import (
    _cpu_flash_reads_grouped_heads,
    rerope_attention,
    rerope_attention_blockwise,
    rerope_attention_flex,
)

SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.25)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SIZES, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    "llama3-rope": lambda: LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "yarn-rope": lambda: LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "yarn", "rope_theta": 100.0, "factor": 2.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: MistralConfig(**SIZES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SIZES),
    "qwen3": lambda: Qwen3Config(**SIZES, head_dim=16),
}
IMPLEMENTATIONS = ["hfx_rerope", "hfx_leaky_rerope"]


def load(family: str, implementation: str, dtype=torch.float32, **options):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=dtype).eval()
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=implementation, dtype=dtype)
    model.load_state_dict(reference.state_dict())
    for name, value in options.items():
        setattr(model.config, name, value)
    return model.eval(), reference


def ids(batch=2, length=40, seed=1):
    return torch.randint(3, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The float64 oracle: apply the remapped relative position to each (query, key) pair explicitly.


def remapped(distance: int, window: int, leaky_factor: float | None) -> float:
    if distance < window:
        return float(distance)
    return float(window) if leaky_factor is None else window + (distance - window) / leaky_factor


def rotate(x: torch.Tensor, angle_positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = angle_positions[..., None].double() * inv_freq.double()
    angles = torch.cat((angles, angles), -1)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def oracle_attention(q_raw, k_raw, v, positions, window, leaky_factor, scaling, inv_freq, logn_length=None):
    """softmax_j((R_{f(i-j)} q_i)·k_j · scale) v over causal, non-padded keys, one pair at a time. float64."""
    batch, heads, length, dim = q_raw.shape
    groups = heads // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for i in range(length):
            if positions[b, i] < 0:
                continue
            keys = [j for j in range(i + 1) if positions[b, j] >= 0]
            logn = max(1.0, math.log(positions[b, i].item() + 1) / math.log(logn_length)) if logn_length else 1.0
            logits = []
            for j in keys:
                distance = torch.tensor(remapped(int(positions[b, i] - positions[b, j]), window, leaky_factor))
                logits.append((rotate(q_raw[b, :, i] * logn, distance, inv_freq) * k_raw[b, :, j]).sum(-1))
            weights = (torch.stack(logits, -1) * scaling).softmax(-1)
            out[b, :, i] = torch.einsum("hk,hkd->hd", weights, v[b][:, keys])
    return out


def flex_kernel(*args, block_size=None, **kwargs):
    """The CUDA prefill kernel, uncompiled so that it runs on the CPU (block_size has no meaning there)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return rerope_attention_flex(*args, compiled=False, **kwargs)


@pytest.fixture(params=["cpu", "cuda_route"])
def kernel_route(request, monkeypatch):
    """Runs a test on the CPU kernels and again on the route a CUDA device takes (flex attention, uncompiled)."""
    if request.param == "cuda_route":
        flex_with_lse = rerope_hfext._flex_with_lse

        def flex_or_dense_stand_in(*args):  # flex attention has no backward on the CPU (see dense_flex_with_lse)
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args[1:4])
            return (dense_flex_with_lse if needs_grad else flex_with_lse)(*args)

        monkeypatch.setattr(rerope_hfext, "rerope_kernel_for", lambda device, q_len: "flex")
        monkeypatch.setattr(rerope_hfext, "rerope_attention_flex", flex_kernel)
        monkeypatch.setattr(rerope_hfext, "_flex_with_lse", flex_or_dense_stand_in)
    return request.param


@pytest.mark.parametrize("kernel", [rerope_attention, rerope_attention_blockwise, flex_kernel],
                         ids=["fused", "blockwise", "flex"])
@pytest.mark.parametrize("leaky_factor", [None, 4.0], ids=["rerope", "leaky"])
@pytest.mark.parametrize("block_size", [3, None])
@pytest.mark.parametrize("q_len", [13, 4, 1], ids=["prefill", "chunk", "decode"])
def test_kernels_equal_the_float64_oracle(kernel, leaky_factor, block_size, q_len):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim, window = 3, 4, 2, 13, 8, 4
    inv_freq = 1.0 / (10.0 ** (torch.arange(0, dim, 2).double() / dim))
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    positions = torch.arange(length).repeat(batch, 1)
    positions[1, :3] = -1  # left padding
    positions[1, 3:] = torch.arange(length - 3)
    positions[2, -2:] = -1  # right padding
    pos = positions.clamp(min=0).double()
    far_q = torch.full_like(pos, window) if leaky_factor is None else (pos - window) / leaky_factor + window
    far_k = torch.zeros_like(pos) if leaky_factor is None else pos / leaky_factor
    rot = lambda x, p: rotate(x, p[:, None], inv_freq)  # noqa: E731
    tail = min(length, q_len + window - 1)
    out = kernel(rot(q, pos)[:, :, -q_len:], rot(q, far_q)[:, :, -q_len:], rot(k, pos)[:, :, -tail:],
                 rot(k, far_k), v, positions, window, 0.3, block_size=block_size)
    expected = oracle_attention(q, k, v, positions, window, leaky_factor, 0.3, inv_freq).transpose(1, 2)
    real = positions[:, -q_len:] >= 0
    torch.testing.assert_close(out[real], expected[:, -q_len:][real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [rerope_attention, flex_kernel], ids=["fused", "flex"])
def test_padding_between_tokens_is_rejected(kernel):
    q = torch.randn(1, 2, 6, 4)
    positions = torch.tensor([[0, 1, -1, 2, 3, 4]])
    with pytest.raises(ValueError, match="padding at the start or the end of a row only"):
        kernel(q, q, q, q, q, positions, 2, 0.5)


def dense_flex_with_lse(attend, query, key, value, block_mask, scale):
    """flex attention with `block_mask`, computed densely with differentiable torch ops: (out, lse)."""
    from torch.nn.attention.flex_attention import create_mask

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    allowed = create_mask(block_mask.mask_mod, query.shape[0], 1, query.shape[2], key.shape[2], query.device)
    seen = allowed.any(-1)  # rows without any key: lse −inf, output 0, and no NaN in the gradients
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    scores = scores.masked_fill(~seen[..., None], 0.0)
    lse = scores.logsumexp(-1)
    out = (torch.exp(scores - lse[..., None]) * allowed) @ value
    return out, lse.masked_fill(~seen, float("-inf"))


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("leaky_factor", [None, 4.0], ids=["rerope", "leaky"])
def test_flex_route_gradients_equal_the_blockwise_kernels(leaky_factor, sliding_window, monkeypatch):
    """Training on CUDA runs the flex route: its gradients through the block masks and the log-sum-exp merge equal
    the blockwise kernel's, with grouped heads, padding at both ends and a sliding window, in float64. Flex attention
    has no backward on the CPU, so each pass is computed here by a dense stand-in for the same masked attention
    (flex attention's own backward is checked on CUDA by benchmarks/device_check.py)."""
    monkeypatch.setattr(rerope_hfext, "_flex_with_lse", dense_flex_with_lse)
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim, window = 2, 4, 2, 19, 8, 5
    positions = torch.arange(length).repeat(batch, 1)
    positions[0, :4] = -1
    positions[0, 4:] = torch.arange(length - 4)
    positions[1, -3:] = -1
    inputs = [torch.randn(batch, h, length, dim, dtype=torch.float64, requires_grad=True)
              for h in (heads, heads, kv_heads, kv_heads, kv_heads)]  # near/far queries, near/far keys, values
    grad_out = torch.randn(batch, length, heads, dim, dtype=torch.float64)
    gradients = []
    for kernel in (flex_kernel, rerope_attention_blockwise):
        out = kernel(*inputs, positions, window, 0.3, sliding_window=sliding_window)
        gradients.append(torch.autograd.grad(out, inputs, grad_out))
    for flex_grad, blockwise_grad in zip(*gradients):
        torch.testing.assert_close(flex_grad, blockwise_grad, rtol=0, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in gradients[0])


def test_a_flex_attention_failure_falls_back_once_and_says_so(monkeypatch):
    """Flex attention is compiled on first use; where that fails (an old Triton, an unsupported GPU) the call and
    every later one take the other kernels (on CUDA the blockwise one), with one RuntimeWarning naming the error."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 80, 8), torch.randn(2, 2, 80, 8), torch.randn(2, 2, 80, 8)
    positions = torch.arange(80).repeat(2, 1)
    expected = rerope_attention(q, q, k, k, v, positions, 8, 0.5)  # the CPU kernel
    monkeypatch.setattr(rerope_hfext, "flex_failure", None)
    monkeypatch.setattr(rerope_hfext, "_flex_module", lambda: object())  # "flex attention is available"
    choose = rerope_hfext.rerope_kernel_for
    monkeypatch.setattr(rerope_hfext, "rerope_kernel_for", lambda device, q_len: choose(torch.device("cuda"), q_len))

    def broken_flex(*args, **kwargs):
        raise RuntimeError("triton: no kernel for this GPU")

    monkeypatch.setattr(rerope_hfext, "rerope_attention_flex", broken_flex)
    assert choose(torch.device("cuda"), 4096) == "flex"
    with pytest.warns(RuntimeWarning, match="flex attention failed .RuntimeError: triton: no kernel for this GPU."):
        assert torch.equal(rerope_attention(q, q, k, k, v, positions, 8, 0.5), expected)
    assert choose(torch.device("cuda"), 4096) == "blockwise"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: flex is not tried again
        assert torch.equal(rerope_attention(q, q, k, k, v, positions, 8, 0.5), expected)


def test_each_device_gets_the_kernel_whose_memory_is_linear(monkeypatch):
    cuda = torch.device("cuda")
    assert rerope_hfext.rerope_kernel_for(torch.device("cpu"), 4096) == "cpu"
    assert rerope_hfext.rerope_kernel_for(cuda, 4096) == "flex"
    assert rerope_hfext.rerope_kernel_for(cuda, 1) == "blockwise"  # a decode step builds 1 × L scores
    monkeypatch.setattr(rerope_hfext, "_flex_module", lambda: None)  # torch without flex attention
    assert rerope_hfext.rerope_kernel_for(cuda, 4096) == "blockwise"


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["llama", "llama3-rope", "yarn-rope"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_model_equals_the_float64_oracle_with_logn(implementation, family, kernel_route):
    """A whole model with hfx_(leaky_)rerope equals the same model whose attention is the explicit oracle, with the
    model's own rotary table (default, llama3, yarn with its attention scaling)."""
    leaky = 3.0 if implementation == "hfx_leaky_rerope" else None
    options = dict(rerope_window=5, logn_scaling=True, logn_training_length=8)
    if leaky:
        options["rerope_leaky_factor"] = leaky
    model, _ = load(family, implementation, torch.float64, **options)
    inv_freq = model.model.rotary_emb.inv_freq.double()

    def oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
        positions = kwargs["position_ids"].expand(query.shape[0], -1)
        # undo the model's rotation to get the raw projections, then apply the remapped distances explicitly
        q_raw = rotate(query, -positions[:, None].double(), inv_freq)
        k_raw = rotate(key, -positions[:, None].double(), inv_freq)
        out = oracle_attention(q_raw, k_raw, value, positions, 5, leaky, scaling, inv_freq, logn_length=8)
        return out.transpose(1, 2), None

    AttentionInterface.register("test_rerope_oracle", oracle)
    AttentionMaskInterface.register("test_rerope_oracle", sdpa_mask)
    # from_config shares the config object and sets its attention implementation: always give it a copy
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="test_rerope_oracle",
                                                 dtype=torch.float64).eval()
    reference.load_state_dict(model.state_dict())
    tokens = ids(1, 16)
    assert model.config._attn_implementation == implementation
    # transformers rotates in float32 even for float64 models, so the un-rotation is exact to ~1e-7 only
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa",
                                             dtype=torch.float64).eval()
    plain.load_state_dict(model.state_dict())
    assert (plain(tokens).logits - model(tokens).logits).abs().max() > 1e-3  # the remap really changes the output


# ---------------------------------------------------------------------------------------------------------------
# Degenerate settings


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_window_covering_the_sequence_is_identical_to_sdpa(implementation):
    model, reference = load("qwen2", implementation, rerope_window=64, logn_scaling=False)
    tokens = ids()
    if _cpu_flash_reads_grouped_heads():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    else:  # older torch: the grouped key/value heads are repeated before the kernel, which rounds differently
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=1e-5, atol=1e-5)


def test_leaky_factor_one_is_plain_rope():
    model, reference = load("llama", "hfx_leaky_rerope", rerope_window=4, rerope_leaky_factor=1.0, logn_scaling=False)
    tokens = ids()
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-5)


def test_logn_alone_leaves_the_training_range_untouched_and_scales_beyond():
    model, reference = load("llama", "hfx_logn", logn_training_length=16)
    tokens = ids(2, 24)
    logits, expected = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(logits[:, :16], expected[:, :16], rtol=0, atol=1e-5)
    assert (logits[:, 16:] - expected[:, 16:]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Cache consistency: prefill of n+1 tokens == prefill of n plus one cached decode step


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "hfx_logn"])
@pytest.mark.parametrize("n", [3, 7, 8, 30])  # window 8: n < w, n ≈ w, n ≫ w
def test_decode_step_equals_prefill(family, implementation, n):
    model, _ = load(family, implementation, rerope_window=8, logn_training_length=12)
    assert decode_step_gap(model, ids(3, n + 1), n) <= 1e-4  # batch of 3, one row left-padded


@pytest.mark.smoke
@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "hfx_logn"])
def test_generate_with_cache_equals_without_and_with_left_padding(implementation, kernel_route):
    model, _ = load("llama", implementation, rerope_window=6, logn_training_length=10)
    prompt = ids(1, 9, seed=4)
    settings = dict(max_new_tokens=14, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **settings)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    other = ids(1, 12, seed=5)
    batch = torch.cat([padded, other])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    batched = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(batched[0, 3:], cached[0])
    assert torch.equal(batched[1], model.generate(other, **settings)[0])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inference_mode_gives_the_no_grad_logits(implementation, kernel_route):
    """Inference-mode tensors carry no version counter: the per-forward memo of the padding checks must not need
    one (benchmarks and pipelines run under torch.inference_mode)."""
    model, _ = load("llama", implementation, rerope_window=6, logn_training_length=10)
    tokens = ids(2, 20)
    with torch.no_grad():
        expected = model(tokens).logits
    with torch.inference_mode():
        assert torch.equal(model(tokens).logits, expected)


def test_sliding_window_checkpoint_keeps_its_window(kernel_route):
    """Mistral with a sliding window: ReRoPE applies inside the sliding window, nothing beyond it is attended."""
    torch.manual_seed(0)
    config = MistralConfig(**SIZES, sliding_window=10)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hfx_rerope").eval()
    model.config.rerope_window = 4
    tokens = ids(2, 24)
    full = model(tokens).logits[:, -1]
    prefix = model(tokens[:, :23], use_cache=True)
    step = model(tokens[:, 23:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert (full - step).abs().max() <= 1e-4
    changed = tokens.clone()
    changed[:, :5] = 3  # beyond the two layers' reach of 2 × 9 tokens
    torch.testing.assert_close(model(changed).logits[:, -1], full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize("family", ["llama", "qwen3", "yarn-rope"])
def test_far_keys_use_the_frequencies_of_the_models_own_rotary_module(family, monkeypatch):
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    from hf_ext.attention import _cached_inv_freq

    # A family whose default formula differs from θ^(−2i/d) must be followed, not re-derived: doubling the
    # frequencies of Llama's and Qwen3's rotary classes changes what their models (and the far keys) use.
    for rotary in (modeling_llama.LlamaRotaryEmbedding, modeling_qwen3.Qwen3RotaryEmbedding):
        original = rotary.compute_default_rope_parameters
        monkeypatch.setattr(rotary, "compute_default_rope_parameters",
                            staticmethod(lambda config, *a, _f=original, **k: (2 * _f(config)[0], 1.0)))
    model, _ = load(family, "hfx_rerope")
    layer = model.model.layers[0].self_attn
    used = _cached_inv_freq(layer, model.config, layer.head_dim, "hfx_rerope")
    torch.testing.assert_close(used, model.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_non_rope_model_is_rejected_with_a_clear_error():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50),
                                             attn_implementation="hfx_rerope")
    with pytest.raises(ValueError, match=r"needs a model with rotary position embeddings.*gpt2"):
        model(torch.randint(0, 50, (1, 40)))


def test_partial_rotary_model_is_rejected_with_a_clear_error():
    config = LlamaConfig(**SIZES, rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                   "partial_rotary_factor": 0.5})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hfx_rerope")
    model.config.rerope_window = 4
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        model(ids(1, 20))


def test_dynamic_rope_is_rejected():
    config = LlamaConfig(**SIZES, rope_parameters={"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hfx_rerope")
    model.config.rerope_window = 4
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        model(ids(1, 20))


@pytest.mark.parametrize(
    "option, value, message",
    [("rerope_window", 0, "`rerope_window` must be a positive integer"),
     ("rerope_window", 2.5, "`rerope_window` must be a positive integer"),
     ("rerope_leaky_factor", 0.5, "`rerope_leaky_factor` must be a finite number >= 1"),
     ("logn_scaling", "yes", "`logn_scaling` must be True or False")],
)
def test_bad_options_name_the_option(option, value, message):
    model, _ = load("llama", "hfx_leaky_rerope", **{option: value})
    with pytest.raises(ValueError, match=message):
        model(ids(1, 20))


def test_options_through_rerope_config_and_from_pretrained(tmp_path):
    _, reference = load("llama", "sdpa")
    reference.save_pretrained(tmp_path)
    config = hf_ext.rerope_config(tmp_path, rerope_window=6, rerope_leaky_factor=8.0, logn_scaling=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=config, attn_implementation="hfx_leaky_rerope")
    assert (model.config.rerope_window, model.config.rerope_leaky_factor) == (6, 8.0)
    tokens = ids(1, 30)
    assert (model(tokens).logits - reference(tokens).logits).abs().max() > 1e-3
    # the options survive save/load with the config
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="hfx_leaky_rerope")
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits)


def test_rerope_config_rejects_unsupported_models_at_load(tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a model with rotary position embeddings"):
        hf_ext.rerope_config(tmp_path)
    with pytest.raises(ValueError, match="`rerope_window` must be a positive integer"):
        hf_ext.rerope_config(FAMILIES["llama"](), rerope_window=-3)


@pytest.mark.parametrize("option, value", [("rerope_window", 0), ("rerope_leaky_factor", 0.5),
                                           ("logn_training_length", 1)])
def test_stock_models_and_hfext_configs_share_one_check_per_option(option, value):
    """The options are defined once (configuration_hfext.py): `HfExtConfig`, `rerope_config` and the attention
    function of a Llama checkpoint reject the same value with the same message."""
    with pytest.raises(ValueError) as from_hfext:
        hf_ext.HfExtConfig(**SIZES, logn_scaling=True, **{option: value})
    with pytest.raises(ValueError) as from_rerope_config:
        hf_ext.rerope_config(FAMILIES["llama"](), **{option: value})
    model, _ = load("llama", "hfx_leaky_rerope", **{option: value})
    with pytest.raises(ValueError) as from_attention:
        model(ids(1, 20))
    message = str(from_hfext.value)
    assert f"`{option}`" in message and repr(value) in message, message
    assert str(from_rerope_config.value) == message and str(from_attention.value) == message


def test_stock_models_and_hfext_configs_share_the_defaults():
    from hf_ext.attention import rerope_options

    hfext = hf_ext.HfExtConfig(**SIZES)
    for config in (FAMILIES["llama"](), hfext):
        options = rerope_options(config, leaky=True)
        assert (options["window"], options["leaky_factor"], options["training_length"]) == (
            hfext.rerope_window, hfext.rerope_leaky_factor, hfext.logn_training_length) == (8, 16.0, 32)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("value_dim, kernel_reads_groups", [(8, True), (8, False), (5, True)],
                         ids=["fused-op", "fused-op-repeated-heads", "explicit"])
def test_attention_with_lse_wrapper_matches_softmax(is_causal, value_dim, kernel_reads_groups, monkeypatch):
    """The one place the private fused CPU op is used: output and log-sum-exp equal a float64 softmax, also where
    the kernel cannot read grouped key/value heads (older torch) and they are repeated first."""
    from hf_ext.models.hfext import rerope_hfext
    from hf_ext.ops import attention_with_lse

    if not kernel_reads_groups:
        monkeypatch.setattr(rerope_hfext, "_cpu_flash_reads_grouped_heads", lambda: False)
    elif not _cpu_flash_reads_grouped_heads():
        pytest.skip("this torch's CPU flash kernel reads grouped heads wrongly (the repeated-heads case covers it)")

    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 7, value_dim, dtype=torch.float64)
    mask = torch.zeros(5, 7, dtype=torch.float64).masked_fill(torch.rand(5, 7) < 0.3, float("-inf"))
    mask[:, 0] = 0.0  # every row sees at least one key
    out, lse = attention_with_lse(q, k, v, 0.4, is_causal=is_causal, mask=None if is_causal else mask)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.4
    scores = scores.masked_fill(torch.ones(5, 7, dtype=torch.bool).triu(1), float("-inf")) if is_causal else scores + mask
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(out, scores.softmax(-1) @ v.repeat_interleave(2, 1))
