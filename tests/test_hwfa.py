"""HfExt's ReRoPE switch (`rerope_mode`), HWFA / HWFA+ReRoPE layouts and presets."""

import copy

import pytest
import torch
from conftest import decode_step_gap, tiny_config
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import hf_ext
from hf_ext.hub import preset_path
from hf_ext.hwfa import full_layer_indices, hwfa_config, hwfa_window

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.25, pad_token_id=0)


def build(config, attn="sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).eval()


def ids(batch, length, seed=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def test_hwfa_v1_layout():
    config = hwfa_config("hwfa", num_hidden_layers=24, max_position_embeddings=512, **SMALL)
    assert config.layer_types == ["sliding_attention"] * 23 + ["full_attention"]
    assert config.position_encodings == ["rope"] * 23 + ["none"]
    assert config.logn_scaling == [False] * 23 + [True]
    # the blog's setting: L = 24, N = 512 gives w = 16 and a receptive field (w-1)(L-1)+1 = 346 ≈ 0.68 N
    assert config.sliding_window == hwfa_window(24, 512) == 17
    assert (config.sliding_window - 1) * 23 + 1 <= 0.75 * 512 < config.sliding_window * 23 + 1


@pytest.mark.parametrize("full, expected", [(1, [12]), (2, [8, 16])])
def test_hwfa_rerope_places_full_layers_inside_the_stack(full, expected):
    assert full_layer_indices(24, full) == expected
    config = hwfa_config("hwfa_rerope", num_hidden_layers=24, max_position_embeddings=512, num_full_layers=full, **SMALL)
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == expected
    assert config.position_encodings == ["rope"] * 24
    assert [i for i, on in enumerate(config.logn_scaling) if on] == expected
    assert config.sliding_window == 2 * 512 // 24 and config.rerope_window == 256 and config.rerope_mode == "off"


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match="`variant`.*'hwfa_rerope'"):
        hwfa_config("swa", num_hidden_layers=4, max_position_embeddings=64, **SMALL)
    with pytest.raises(ValueError, match="`num_full_layers` must be between 1 and"):
        hwfa_config("hwfa_rerope", num_hidden_layers=4, max_position_embeddings=64, num_full_layers=4, **SMALL)


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["hwfa-small", "hwfa-rerope-small"])
def test_hwfa_presets_load_and_use_sliding_caches(name):
    config = hf_ext.HfExtConfig.from_pretrained(preset_path(name))
    cache = DynamicCache(config=config)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicLayer if kind == "full_attention" else DynamicSlidingWindowLayer
                     for kind in config.layer_types]


@pytest.mark.parametrize("bad, message", [
    (dict(rerope_mode="yarn"), "`rerope_mode` is 'yarn'; allowed values are"),
    (dict(rerope_window=0), "`rerope_window` must be a positive integer"),
    (dict(rerope_leaky_factor=0.5), "`rerope_leaky_factor` must be a finite number >= 1"),
])
def test_rerope_fields_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


# ---------------------------------------------------------------------------------------------------------------
# rerope_mode: the HfExt path equals the existing-checkpoint path, caches far keys, survives save/load


def hwfa_tiny(**overrides):
    settings = dict(num_hidden_layers=3, max_position_embeddings=16, num_full_layers=1, sliding_window=4,
                    rerope_window=6)
    settings.update(overrides)
    return hwfa_config("hwfa_rerope", **settings, **SMALL)


@pytest.mark.parametrize("mode, implementation", [("rerope", "hfx_rerope"), ("leaky_rerope", "hfx_leaky_rerope")])
def test_rerope_mode_equals_the_attention_implementation(mode, implementation):
    """Two independent routes to the same numbers: the model's own ReRoPE layers vs the hfx_* attention function
    (itself checked against a float64 oracle in test_rerope.py) on the plain-RoPE model."""
    config = hwfa_tiny(rerope_leaky_factor=3.0)
    reference = build(config, implementation)
    ours = build(config)
    ours.load_state_dict(reference.state_dict())
    ours.config.rerope_mode = mode
    tokens = ids(2, 30)
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = reference(tokens, attention_mask=mask, position_ids=positions).logits
    actual = ours(tokens, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    # The routes build their rotary angles differently, both in float32 as transformers does (even for a float64
    # model): their gap is ~1e-5 on these logits (1.03e-5 seen on one machine, which failed the former atol=1e-5).
    # A wrong distance or window moves the logits by more than 1e-3 (asserted below), so 1e-4 still tells them apart.
    torch.testing.assert_close(actual[keep], expected[keep], rtol=0, atol=1e-4)
    off = build(config)
    off.load_state_dict(reference.state_dict())
    assert (off(tokens).logits - ours(tokens).logits).abs().max() > 1e-3  # the switch changes the computation


def test_rerope_cache_holds_unrotated_keys_so_decoding_rotates_only_the_window():
    model = build(hwfa_tiny())
    model.config.rerope_mode = "rerope"
    full_layer = model.model.layers[1].self_attn
    assert model.config.layer_types[1] == "full_attention"
    captured = {}
    full_layer.k_proj.register_forward_hook(lambda module, args, out: captured.update(keys=out))
    cache = DynamicCache(config=model.config)
    model(ids(1, 20), past_key_values=cache, use_cache=True)
    raw = captured["keys"].view(1, 20, 2, -1).transpose(1, 2)
    torch.testing.assert_close(cache.layers[1].keys, raw)


@pytest.mark.smoke
@pytest.mark.parametrize("mode", ["rerope", "leaky_rerope"])
@pytest.mark.parametrize("n", [3, 6, 7, 25])  # rerope window 6: n < w, n ≈ w, n ≫ w
def test_rerope_mode_decode_step_equals_prefill(mode, n):
    model = build(hwfa_tiny())
    model.config.rerope_mode = mode
    assert decode_step_gap(model, ids(3, n + 1), n) <= 1e-4  # batch of 3, one row left-padded


def test_rerope_mode_generate_and_window_cache_stays_bounded():
    model = build(hwfa_tiny())
    model.config.rerope_mode = "rerope"
    prompt = ids(1, 10, seed=3)
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                                     use_cache=False))
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths[1] == 29  # the full layer keeps everything
    assert lengths[0] == lengths[2] == model.config.sliding_window - 1  # window layers: O(window) memory


def test_rerope_switch_survives_save_and_load(tmp_path):
    model = build(hwfa_tiny())
    model.config.rerope_mode = "leaky_rerope"
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rerope_mode == "leaky_rerope"
    tokens = ids(1, 24)
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_training_with_rerope_on_backpropagates_exactly():
    """With gradients the blockwise kernel runs; its forward equals the fused inference path."""
    model = build(hwfa_tiny())
    model.config.rerope_mode = "rerope"
    tokens = ids(2, 20)
    with torch.no_grad():
        fused = model(tokens).logits
    model.train()
    out = model(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, fused, rtol=0, atol=1e-5)
    out.loss.backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_logn_switch_is_read_at_call_time():
    model = build(hwfa_tiny())
    tokens = ids(1, 30)
    before = model(tokens).logits  # the full layer scales queries beyond its training length of 16
    model.config.logn_scaling = [False] * 3
    after = model(tokens).logits
    assert (after - before).abs().max() > 1e-3
