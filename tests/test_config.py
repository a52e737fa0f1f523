"""HfExtConfig: defaults, per-layer fields, validation messages, presets."""

import pytest
from conftest import tiny_config

import hf_ext
from hf_ext.hub import list_presets, preset_path


def test_defaults_fill_one_entry_per_layer():
    config = tiny_config()
    assert config.layer_types == ["full_attention"] * 3
    assert config.position_encodings == ["rope"] * 3
    assert config.logn_scaling == [False] * 3
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    assert config.logn_training_length == config.max_position_embeddings
    assert config.attention_output_bias is False


def test_single_logn_flag_applies_to_every_layer():
    assert tiny_config(logn_scaling=True).logn_scaling == [True] * 3


@pytest.mark.smoke
def test_round_trip_through_json(tmp_path):
    config = tiny_config(layer_types=["sliding_attention", "full_attention", "full_attention"], sliding_window=8,
                         position_encodings=["rope", "none", "rope"], logn_scaling=[False, True, False])
    config.save_pretrained(tmp_path)
    loaded = hf_ext.HfExtConfig.from_pretrained(tmp_path)
    for field in ("layer_types", "sliding_window", "position_encodings", "logn_scaling", "head_dim"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        (dict(hidden_size=60, num_attention_heads=8), "num_attention_heads", "head_dim"),
        (dict(num_key_value_heads=3), "num_key_value_heads", "[1, 2, 4]"),
        (dict(layer_types=["sliding_attention"] * 3, sliding_window=0), "sliding_window", "positive integer"),
        (dict(layer_types=["sliding_attention"] * 3), "sliding_window", "positive integer"),
        (dict(layer_types=["full_attention", "global", "full_attention"]), "layer_types[1]", "'sliding_attention'"),
        (dict(layer_types=["full_attention"] * 2), "layer_types", "one entry per layer"),
        (dict(position_encodings=["rope", "alibi", "rope"]), "position_encodings[1]", "'none'"),
        (dict(logn_scaling=[True]), "logn_scaling", "one entry per layer"),
        (dict(attention_dropout=1.5), "attention_dropout", "[0, 1)"),
        (dict(head_dim=15), "head_dim", "even"),
        (dict(num_hidden_layers=0), "num_hidden_layers", "positive integer"),
        (dict(logn_scaling=True, logn_training_length=1), "logn_training_length", "at least 2"),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_values(overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    message = str(error.value)
    assert f"`{field}`" in message and allowed in message, message


def test_wrong_types_are_rejected():
    with pytest.raises(Exception, match="hidden_size"):
        tiny_config(hidden_size="64")


@pytest.mark.smoke
@pytest.mark.parametrize("name", ["hfext-tiny", "hfext-small", "hfext-100m"])
def test_presets_load_with_from_pretrained(name):
    assert name in list_presets()
    config = hf_ext.HfExtConfig.from_pretrained(preset_path(name))
    assert config.model_type == "hf_ext" and len(config.layer_types) == config.num_hidden_layers


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="hfext-tiny"):
        preset_path("hfext-huge")
