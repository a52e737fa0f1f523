"""Bad input to the model side — configs, the tail-capped loss, LoRA-GA, adapters — is refused with a message that
names the argument, the value and what is allowed; nothing is written or loaded half-way."""

import json
import math

import pytest
import torch
from conftest import tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from test_lora_ga import tiny_llama, token_batches
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_ext
from hf_ext.hwfa import hwfa_config
from hf_ext.losses import TailCappedLoss
from hf_ext.peft import GradientViewLoraConfig, get_lora_ga_model
from hf_ext.peft.gradient_sketch import default_loss

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------------------------------------------------------
# Config attributes set at run time, and save_pretrained


@pytest.mark.parametrize("name, value, message", [
    ("rerope_mode", "Off", r"`rerope_mode` is 'Off'; allowed values are \['off', 'rerope', 'leaky_rerope'\]"),
    ("rerope_window", 0, "`rerope_window` must be a positive integer"),
    ("rerope_leaky_factor", NAN, "`rerope_leaky_factor` must be a finite number >= 1"),
    ("logn_clip_min", NAN, "`logn_clip_min` must be None .* or a finite number >= 0"),
    ("mla_implementation", "fast", "`mla_implementation`"),
])
def test_a_bad_run_time_option_is_refused_on_assignment_and_the_old_value_kept(name, value, message):
    model = AutoModelForCausalLM.from_config(tiny_config())
    before = getattr(model.config, name)
    with pytest.raises(ValueError, match=message):
        setattr(model.config, name, value)
    assert getattr(model.config, name) == before or (before != before)


def test_save_pretrained_refuses_an_invalid_config_before_writing_anything(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config())
    model.config.__dict__["rerope_mode"] = "Off"  # past the assignment check, e.g. by editing __dict__
    with pytest.raises(ValueError, match="`rerope_mode` is 'Off'"):
        model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="`rerope_mode` is 'Off'"):
        model.config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "model").exists() and not (tmp_path / "config").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(rms_norm_eps=NAN), "`rms_norm_eps` must be a finite number > 0"),
    (dict(rms_norm_eps=INF), "`rms_norm_eps` must be a finite number > 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": NAN}), r"`rope_parameters\['rope_theta'\]`"),
    (dict(rope_theta=INF), r"`rope_parameters\['rope_theta'\]` must be a finite number > 0"),
    (dict(logn_clip_min=NAN), "`logn_clip_min`"),
    (dict(rerope_leaky_factor=NAN), "`rerope_leaky_factor`"),
    (dict(attention_dropout=NAN), "`attention_dropout` must be in"),
    (dict(initializer_range=NAN), "`initializer_range` must be in"),
])
def test_nan_and_inf_config_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_hwfa_config_keeps_an_explicit_zero_window_and_refuses_it():
    settings = dict(num_hidden_layers=4, max_position_embeddings=64, vocab_size=97, hidden_size=32,
                    intermediate_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="`sliding_window` must be a positive integer"):
        hwfa_config("hwfa_rerope", sliding_window=0, **settings)
    with pytest.raises(ValueError, match="`sliding_window` must be a positive integer"):
        hwfa_config("hwfa", sliding_window=0, **settings)
    with pytest.raises(ValueError, match="`rerope_window` must be a positive integer"):
        hwfa_config("hwfa_rerope", rerope_window=0, **settings)


def test_rerope_config_of_something_that_is_no_config_names_the_argument():
    with pytest.raises(ValueError, match="config_or_path must be a transformers config .* got 123"):
        hf_ext.rerope_config(123)


def test_a_stock_model_with_nan_rope_theta_refuses_rerope():
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    config.rope_parameters["rope_theta"] = NAN
    with pytest.raises(ValueError, match="rotary frequencies of llama are not all finite"):
        hf_ext.rerope_config(config)


# ---------------------------------------------------------------------------------------------------------------
# TailCappedLoss


def test_labels_that_do_not_match_the_logits_are_refused():
    loss = TailCappedLoss(gamma=0.5)
    logits = torch.randn(2, 6, 11)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 5\) do not match logits of shape \(2, 6, 11\)"):
        loss(logits, torch.randint(0, 11, (2, 5)))
    with pytest.raises(ValueError, match=r"shift_labels of shape \(2, 7\)"):
        loss(logits, None, shift_labels=torch.randint(0, 11, (2, 7)))
    with pytest.raises(ValueError, match=r"labels of shape \(2, 5\) do not match hidden_states"):
        loss.loss_from_hidden_states(torch.randn(2, 6, 8), torch.nn.Linear(8, 11), torch.randint(0, 11, (2, 5)))


@pytest.mark.parametrize("count", [0, -3, torch.tensor(0), NAN])
def test_num_items_in_batch_must_be_positive(count):
    with pytest.raises(ValueError, match="num_items_in_batch must be a finite number > 0"):
        TailCappedLoss(gamma=0.5)(torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6)), num_items_in_batch=count)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=NAN), "gamma must be a finite number in \\[0, 1\\)"),
    (dict(gamma=True), "gamma must be"),
    (dict(gamma=0.5, min_weight=NAN), "min_weight"),
    (dict(gamma=0.5, chunk_size=2.0), "chunk_size must be an integer >= 1"),
    (dict(gamma=0.5, fused="yes"), "fused must be one of False, True"),
])
def test_tail_capped_loss_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TailCappedLoss(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# LoRA-GA and adapters


@pytest.mark.parametrize("loss", ["chunked", "model"])
def test_lora_ga_refuses_gradient_batches_without_a_single_target_token(loss):
    """The model's own loss is 0/0 = NaN and is refused at the first batch; the chunked loss (the default for
    Llama-style models) gives 0 and a zero gradient, refused after the first pass. Both name the cause."""
    batches = [{**batch, "labels": torch.full_like(batch["labels"], -100)} for batch in token_batches()]
    loss_fn = None if loss == "chunked" else default_loss
    with pytest.raises(ValueError, match="every label of the (batch|gradient batches) is the ignore index"):
        get_lora_ga_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), batches, loss_fn=loss_fn,
                          show_progress=False)


def test_lora_ga_refuses_a_zero_gradient():
    def zero_loss(model, batch):
        return model(input_ids=batch["input_ids"]).logits.sum() * 0.0

    with pytest.raises(ValueError, match="mean gradient of LoRA-GA target .*q_proj.* is zero"):
        get_lora_ga_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), token_batches(),
                          loss_fn=zero_loss, show_progress=False)


def test_lora_ga_refuses_a_non_finite_gradient():
    def overflowing_loss(model, batch):  # a finite loss (0) whose gradient is NaN: d√u/du = inf at u = 0
        return torch.sqrt(model(input_ids=batch["input_ids"]).logits.sum() * 0.0)

    with pytest.raises(ValueError, match="not finite"):
        get_lora_ga_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), token_batches(),
                          loss_fn=overflowing_loss, show_progress=False)


@pytest.mark.parametrize("gamma", [INF, NAN, 0, -1])
def test_lora_ga_refuses_a_stable_gamma_that_is_not_finite_and_positive(gamma):
    with pytest.raises(ValueError, match="stable_gamma must be a finite number > 0"):
        get_lora_ga_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), token_batches(),
                          stable_gamma=gamma, show_progress=False)


def test_a_lora_adapter_declared_as_gradient_view_is_refused_and_left_unchanged(tmp_path):
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    declared = GradientViewLoraConfig(r=2, target_modules=["q_proj"]).to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps(declared, default=list))
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds no gradient-view LoRA tensors .*lora_A"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == weights


def test_gradient_view_factors_declared_as_resample_are_refused(tmp_path):
    get_peft_model(tiny_llama(), GradientViewLoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "mode": "resample"}))
    with pytest.raises(ValueError, match="holds rank-r factors.*says mode 'resample'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
