"""The HfExt decoder: parity with Llama, cache consistency, padding, attention backends, training paths."""

import math

import pytest
import torch
from conftest import enable_activation_checkpointing, hybrid_config, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import hf_ext
from hf_ext.registry import ATTENTION_IMPLEMENTATIONS

ATTENTION_BACKENDS = ["sdpa", "eager", *sorted(ATTENTION_IMPLEMENTATIONS)]


def build(config, attn="sdpa", dtype=torch.float32):
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


def random_ids(batch, length, vocab=97, generator_seed=1):
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers' Llama


@pytest.mark.smoke
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_default_config_equals_llama_with_same_weights(attn):
    llama_config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    # float32: transformers' own eager path turns left-padded float64 rows into NaN.
    llama = LlamaForCausalLM._from_config(llama_config, attn_implementation=attn).eval()
    config = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    ours = build(config, attn)
    missing, unexpected = ours.load_state_dict(llama.state_dict(), strict=True)
    assert not missing and not unexpected  # same parameter names, so checkpoints are interchangeable
    ids = random_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    expected = llama(ids, attention_mask=mask).logits
    actual = ours(ids, attention_mask=mask).logits
    # Padded query rows see no key at all; only real tokens have meaningful logits.
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-6)


@pytest.mark.smoke
def test_auto_classes_resolve_the_family():
    config = tiny_config()
    assert isinstance(AutoModel.from_config(config), hf_ext.HfExtModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), hf_ext.HfExtForCausalLM)
    assert hf_ext.HfExtConfig.model_type == "hf_ext"


# ---------------------------------------------------------------------------------------------------------------
# Per-layer structure


@pytest.mark.smoke
def test_cache_layers_follow_layer_types():
    config = hybrid_config()
    cache = DynamicCache(config=config)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, DynamicLayer, DynamicSlidingWindowLayer]


def test_sliding_layer_cannot_see_beyond_its_window():
    """Receptive field: with only sliding layers of window w, position t ignores inputs at t-s >= L(w-1)+1."""
    window, layers = 4, 2
    config = tiny_config(num_hidden_layers=layers, layer_types=["sliding_attention"] * layers, sliding_window=window)
    model = build(config, "eager")
    embeds = torch.randn(1, 16, config.hidden_size, requires_grad=True)
    out = model(inputs_embeds=embeds).logits[0, -1].sum()
    (grad,) = torch.autograd.grad(out, embeds)
    reach = layers * (window - 1)
    seen = grad[0].abs().sum(-1) > 0
    assert seen[15 - reach :].all()
    assert not seen[: 15 - reach].any()


def test_nope_full_layer_is_blind_to_key_order():
    """A full NoPE layer is permutation-invariant over its keys: shuffling the prefix leaves the last output equal."""
    config = tiny_config(num_hidden_layers=1, position_encodings=["none"])
    model = build(config, "eager", dtype=torch.float64)
    embeds = torch.randn(1, 12, config.hidden_size, dtype=torch.float64)
    shuffled = torch.cat([embeds[:, torch.randperm(11)], embeds[:, 11:]], dim=1)
    last = model(inputs_embeds=embeds).logits[0, -1]
    last_shuffled = model(inputs_embeds=shuffled).logits[0, -1]
    torch.testing.assert_close(last, last_shuffled)
    rope_model = build(tiny_config(num_hidden_layers=1), "eager", dtype=torch.float64)
    rope_model.load_state_dict(model.state_dict())
    assert not torch.allclose(rope_model(inputs_embeds=embeds).logits[0, -1], rope_model(inputs_embeds=shuffled).logits[0, -1])


def test_logn_scaling_matches_float64_reference():
    """One NoPE layer with log-n scaling equals softmax(s_i q_i k_j / sqrt(d)) computed by hand in float64."""
    config = tiny_config(
        num_hidden_layers=1, position_encodings=["none"], logn_scaling=True, logn_training_length=4, num_key_value_heads=4
    )
    model = build(config, "sdpa", dtype=torch.float64)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, config.hidden_size, dtype=torch.float64)
    captured = {}
    attn.register_forward_hook(lambda mod, args, kwargs, out: captured.update(out=out[0]), with_kwargs=True)
    hidden = model.model.layers[0].input_layernorm(x)
    model(inputs_embeds=x)

    d = config.head_dim
    q = attn.q_proj(hidden).view(1, 10, 4, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, 10, 4, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(1, 10, 4, d).transpose(1, 2)
    scale = torch.tensor([max(1.0, math.log(i + 1) / math.log(4)) for i in range(10)], dtype=torch.float64)
    logits = (q @ k.transpose(-1, -2)) * scale[:, None] / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    reference = attn.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 10, -1))
    torch.testing.assert_close(captured["out"], reference, rtol=0, atol=1e-12)


def test_logn_factor_reference_values():
    positions = torch.tensor([[0, 1, 3, 7, 15, 63]])
    factors = hf_ext.ops.logn_query_scale(positions, training_length=8, clip_min=1.0)
    expected = [max(1.0, math.log(p + 1) / math.log(8)) for p in positions[0].tolist()]
    torch.testing.assert_close(factors[0], torch.tensor(expected, dtype=torch.float64))
    windowed = hf_ext.ops.logn_query_scale(positions, training_length=8, clip_min=None, window=4)
    expected = [math.log(min(p + 1, 4)) / math.log(8) for p in positions[0].tolist()]
    torch.testing.assert_close(windowed[0], torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Cache consistency, padding, generate


@pytest.mark.smoke
@pytest.mark.parametrize("attn", ATTENTION_BACKENDS)
@pytest.mark.parametrize("make_config", [tiny_config, hybrid_config], ids=["plain", "hybrid"])
def test_incremental_decoding_equals_full_forward(attn, make_config):
    model = build(make_config(), attn)
    ids = random_ids(2, 14)
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    prefix = model(ids[:, :6], past_key_values=cache, use_cache=True)
    steps = [prefix.logits]
    for t in range(6, 14):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION_BACKENDS)
def test_left_padding_matches_unpadded_rows(attn):
    model = build(hybrid_config(), attn)
    long_row, short_row = random_ids(1, 12, generator_seed=2), random_ids(1, 7, generator_seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([long_row, torch.cat([pad, short_row], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0], model(long_row).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, 5:], model(short_row).logits[0], rtol=0, atol=1e-5)


@pytest.mark.smoke
@pytest.mark.parametrize("attn", ATTENTION_BACKENDS)
def test_generate_with_cache_equals_without_and_handles_left_padding(attn):
    model = build(hybrid_config(), attn)
    prompt = random_ids(1, 6, generator_seed=4)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    other = random_ids(1, 9, generator_seed=5)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1), other])
    mask = (torch.arange(9) >= torch.tensor([[3], [0]])).long()
    batched = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(batched[0, 3:], cached[0])
    assert torch.equal(batched[1], model.generate(other, **settings)[0])


# ---------------------------------------------------------------------------------------------------------------
# Backends agree, training paths


def test_eager_sdpa_and_registered_backends_agree():
    config = hybrid_config()
    reference = build(config, "eager", dtype=torch.float64)
    ids = random_ids(2, 16)
    expected = reference(ids).logits
    for attn in ATTENTION_BACKENDS[1:]:
        other = build(config, attn, dtype=torch.float64)
        other.load_state_dict(reference.state_dict())
        torch.testing.assert_close(other(ids).logits, expected, rtol=0, atol=1e-10)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = hybrid_config()
    ids = random_ids(2, 12)
    plain = build(config).train()
    checkpointed = build(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.model.gradient_checkpointing
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_bf16_forward_and_backward():
    config = hybrid_config()
    reference = build(config)
    model = build(config, dtype=torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    ids = random_ids(2, 12)
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(out.logits.float(), reference(ids).logits, rtol=0.05, atol=0.05)


def test_training_reduces_the_loss():
    model = build(tiny_config()).train()
    ids = random_ids(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_set_attn_implementation_switches_backend():
    model = build(tiny_config(), "sdpa")
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_hidden_states_and_attentions_can_be_returned():
    model = build(hybrid_config(), "eager")
    out = model(random_ids(1, 8), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert out.attentions[0].shape == (1, 4, 8, 8)
    # the sliding layer (window 5) gives no weight to keys 5 or more positions back
    assert out.attentions[0][0, :, 7, :3].abs().max() == 0
