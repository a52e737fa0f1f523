"""MLA layers in the HfExt family: config validation, the latent cache, absorbed decoding equal to the expanded
form at every step, generate/padding/backends/checkpointing/bf16, save and load."""

import copy

import pytest
import torch
from conftest import enable_activation_checkpointing, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

import hf_ext
from hf_ext.models.hfext.modeling_hfext import HfExtMLAttention


def random_ids(batch, length, generator_seed=1):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(generator_seed))


def deepseek_style(**overrides):
    """Every layer MLA as in DeepSeek-V2/V3: query compression, one shared interleaved rotary key, normalised latent."""
    settings = dict(attention_types=["mla"] * 3, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True)
    return tiny_config(**{**settings, **overrides})


def grouped_hybrid(**overrides):
    """MLA mixed with a GQA layer: no query compression, one rotary key per group of 2 heads, no latent norm,
    a sliding MLA layer and log-n scaling on an MLA layer."""
    settings = dict(attention_types=["mla", "gqa", "mla"], layer_types=["full_attention", "full_attention",
                    "sliding_attention"], sliding_window=5, logn_scaling=[True, False, False], logn_training_length=8,
                    kv_lora_rank=20, qk_nope_head_dim=4, qk_rope_head_dim=16, v_head_dim=16, mla_rope_key_heads=2,
                    kv_latent_norm=False)
    return tiny_config(**{**settings, **overrides})


CONFIGS = {"deepseek_style": deepseek_style, "grouped_hybrid": grouped_hybrid}


def build(config, attn="sdpa", dtype=torch.float32, **config_changes):
    config = copy.deepcopy(config)
    for name, value in config_changes.items():
        setattr(config, name, value)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = hf_ext.HfExtForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so that attention is far from uniform
        for name, parameter in model.named_parameters():
            if "self_attn" in name and parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model


def twin(model, **config_changes):
    """The same weights under another config setting (e.g. mla_implementation)."""
    other = build(model.config, model.config._attn_implementation, next(model.parameters()).dtype, **config_changes)
    other.load_state_dict(model.state_dict())
    return other


def record_paths(model) -> list[tuple[int, bool]]:
    """(query length, absorbed?) for every MLA layer call from now on."""
    calls = []
    for layer in model.model.layers:
        attention = layer.self_attn
        if isinstance(attention, HfExtMLAttention):
            original = attention.use_absorbed

            def spy(q_len, kv_len, original=original):
                absorbed = original(q_len, kv_len)
                calls.append((q_len, absorbed))
                return absorbed

            attention.use_absorbed = spy
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Config validation: every error names the field, the value and what is allowed


@pytest.mark.parametrize("overrides, message", [
    ({"kv_lora_rank": 65}, r"`kv_lora_rank` must be an integer in \[1, 64\].*got 65"),
    ({"kv_lora_rank": None}, "`kv_lora_rank` is required"),
    ({"q_lora_rank": 0}, r"`q_lora_rank` must be an integer in \[1, 64\]"),
    ({"qk_rope_head_dim": 7}, "`qk_rope_head_dim` must be even"),
    ({"qk_rope_head_dim": 18}, r"`qk_rope_head_dim` must be an integer in \[0, 16\].*got 18"),
    ({"qk_nope_head_dim": 0, "qk_rope_head_dim": 0}, "must be positive"),
    ({"v_head_dim": 0}, "`v_head_dim`"),
    ({"mla_rope_key_heads": 3}, r"`mla_rope_key_heads` \(3\) must divide `num_attention_heads` \(4\).*\[1, 2, 4\]"),
    ({"mla_implementation": "fast"}, r"`mla_implementation` is 'fast'; allowed values are \['auto', 'expanded'"),
    ({"attention_types": ["mla", "mqa", "mla"]}, r"`attention_types\[1\]` is 'mqa'; allowed values are \['gqa', 'mla'\]"),
    ({"attention_types": ["mla"]}, "`attention_types` must have one entry per layer"),
    ({"qk_norm": True}, "`qk_norm=True` is not supported with MLA layers"),
    ({"rerope_mode": "rerope"}, "`rerope_mode='rerope'` is not supported with MLA layers"),
])
def test_bad_mla_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        deepseek_style(**overrides)


def test_absorbed_mode_without_mla_layers_is_refused():
    with pytest.raises(ValueError, match="`mla_implementation='absorbed'` applies to MLA layers"):
        tiny_config(mla_implementation="absorbed")


def test_mla_head_dims_default_to_head_dim():
    config = tiny_config(attention_types=["mla"] * 3, kv_lora_rank=16)
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (16, 16, 16)
    assert config.mla_implementation == "auto" and config.mla_rope_key_heads == 1


def test_switching_rerope_on_at_run_time_is_refused_by_mla_layers():
    """Refused on assignment (the config re-validates run-time options), and by the layer if it gets past that."""
    model = build(grouped_hybrid())
    with pytest.raises(ValueError, match="`rerope_mode='rerope'` is not supported with MLA layers"):
        model.config.rerope_mode = "rerope"
    assert model.config.rerope_mode == "off"
    model.config.__dict__["rerope_mode"] = "rerope"
    with pytest.raises(ValueError, match="not supported by MLA layers"):
        model(random_ids(1, 4))


# ---------------------------------------------------------------------------------------------------------------
# The latent cache


@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cache_holds_only_the_latent_and_the_rotary_keys(make_config):
    config = make_config()
    model = build(config)
    out = model(random_ids(2, 4), use_cache=True)  # shorter than the sliding window: every layer holds 4 tokens
    for kind, layer in zip(config.attention_types, out.past_key_values.layers):
        if kind == "mla":
            assert layer.keys.shape == (2, 1, 4, config.kv_lora_rank)
            assert layer.values.shape == (2, 1, 4, config.mla_rope_key_heads * config.qk_rope_head_dim)
    held = sum(layer.keys.numel() + layer.values.numel() for layer in out.past_key_values.layers) * 4
    assert held / (2 * 4) == hf_ext.kv_cache_bytes_per_token(config, dtype=torch.float32)
    per_layer = hf_ext.kv_cache_bytes_per_token(config, dtype=torch.bfloat16, per_layer=True)
    mla = config.kv_lora_rank + config.mla_rope_key_heads * config.qk_rope_head_dim
    assert per_layer == [2 * (mla if kind == "mla" else 2 * 2 * 16) for kind in config.attention_types]


def test_cache_bytes_of_transformers_configs():
    from transformers import DeepseekV3Config, LlamaConfig

    llama = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    assert hf_ext.kv_cache_bytes_per_token(llama, dtype=torch.float16) == 2 * 3 * 64 * 30 * 2
    mha = LlamaConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=2)
    assert hf_ext.kv_cache_bytes_per_token(mha, dtype=torch.float32) == 2 * 4 * 64 * 2 * 4
    deepseek = DeepseekV3Config(num_hidden_layers=61)
    assert hf_ext.kv_cache_bytes_per_token(deepseek, dtype=torch.bfloat16) == (512 + 64) * 61 * 2  # 68.6 KiB
    with pytest.raises(TypeError, match="`dtype` must be a torch.dtype"):
        hf_ext.kv_cache_bytes_per_token(llama, dtype="bf16")


# ---------------------------------------------------------------------------------------------------------------
# Absorbed decoding equals the expanded form


@pytest.mark.smoke
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_absorbed_decode_equals_expanded_forward_at_every_step(make_config, attn):
    model = build(make_config(), attn)
    expanded = twin(model, mla_implementation="expanded")
    ids = random_ids(2, 14)
    full = expanded(ids).logits
    calls = record_paths(model)
    cache = DynamicCache(config=model.config)
    logits = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
    for t in range(6, 14):
        logits.append(model(ids[:, t: t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(logits[-1], full[:, t: t + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=0, atol=1e-5)
    # "auto" chose the expanded form for the prefill and the absorbed form for every decode step
    assert {absorbed for q_len, absorbed in calls if q_len == 6} == {False}
    assert {absorbed for q_len, absorbed in calls if q_len == 1} == {True}


@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_forced_absorbed_prefill_with_left_padding_equals_expanded(make_config):
    model = build(make_config(), dtype=torch.float64)
    absorbed = twin(model, mla_implementation="absorbed")
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for kwargs in ({}, {"attention_mask": mask, "position_ids": positions}):
        expected = model(ids, **kwargs).logits
        got = absorbed(ids, **kwargs).logits
        rows = slice(None) if not kwargs else mask.bool()
        torch.testing.assert_close(got[rows], expected[rows], rtol=0, atol=1e-10)


@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_generate_with_left_padded_batches_equals_single_prompts(make_config):
    model = build(make_config())
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    prompt, other = random_ids(1, 6, generator_seed=4), random_ids(1, 9, generator_seed=5)
    single = model.generate(prompt, **settings)
    assert torch.equal(single, model.generate(prompt, use_cache=False, **settings))
    assert torch.equal(single, twin(model, mla_implementation="expanded").generate(prompt, **settings))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1), other])
    mask = (torch.arange(9) >= torch.tensor([[3], [0]])).long()
    batched = model.generate(batch, attention_mask=mask, **settings)
    # a row that reaches EOS first is padded while the other one goes on
    assert torch.equal(batched[0, 3: 3 + single.shape[1]], single[0]) and not batched[0, 3 + single.shape[1]:].any()
    alone = model.generate(other, **settings)[0]
    assert torch.equal(batched[1, : alone.shape[0]], alone) and not batched[1, alone.shape[0]:].any()


@pytest.mark.parametrize("implementation", ["auto", "absorbed", "expanded"])
@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_static_cache_generate_equals_dynamic(make_config, implementation):
    """A static cache is filled from position 0 with keys beyond the prompt still empty; sdpa then gets no mask
    in the prefill and the absorbed form must read that as torch does (query i sees keys 0..i)."""
    model = build(make_config(), mla_implementation=implementation)
    prompt = random_ids(2, 6)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **settings), dynamic)


@pytest.mark.parametrize("make_config", CONFIGS.values(), ids=CONFIGS.keys())
def test_beam_search_reorders_the_latent_cache(make_config):
    model = build(make_config())
    prompt = random_ids(2, 6)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=3)
    beams = model.generate(prompt, **settings)
    assert torch.equal(beams, model.generate(prompt, use_cache=False, **settings))
    assert torch.equal(beams, twin(model, mla_implementation="expanded").generate(prompt, **settings))


def test_eager_and_sdpa_agree_and_attentions_can_be_returned():
    model = build(grouped_hybrid(), "eager", torch.float64)
    sdpa = twin(model)
    sdpa.set_attn_implementation("sdpa")
    ids = random_ids(2, 12)
    out = model(ids, output_attentions=True)
    torch.testing.assert_close(sdpa(ids).logits, out.logits, rtol=0, atol=1e-10)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 12, 12)
    # the sliding MLA layer (window 5) gives no weight to keys 5 or more positions back
    assert out.attentions[2][0, :, 11, :7].abs().max() == 0


def test_hfx_logn_leaves_mla_layers_to_their_own_scaling():
    """hf_ext's `hfx_logn` attention function scales queries of foreign models; HfExt layers (MLA ones included)
    scale their own queries from `logn_scaling`, so the function must not scale them a second time."""
    model = build(grouped_hybrid(), "sdpa", torch.float64)
    logn = twin(model)
    logn.set_attn_implementation("hfx_logn")
    ids = random_ids(2, 12)
    torch.testing.assert_close(logn(ids).logits, model(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("v_head_dim", [12, 16, 24], ids=["v_narrower", "v_equal", "v_wider"])
def test_sdpa_with_padded_widths_equals_eager(v_head_dim):
    """sdpa gets values (or queries and keys) zero-padded to one width; the result must not change."""
    model = build(deepseek_style(v_head_dim=v_head_dim), "eager", torch.float64)
    sdpa = twin(model)
    sdpa.set_attn_implementation("sdpa")
    ids = random_ids(2, 12)
    torch.testing.assert_close(sdpa(ids).logits, model(ids).logits, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Training paths, precision, adapters


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 12)
    plain = build(deepseek_style()).train()
    checkpointed = twin(plain).train()
    enable_activation_checkpointing(checkpointed)
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("implementation", ["expanded", "absorbed"])
def test_both_forms_give_the_same_gradients(implementation):
    ids = random_ids(2, 10)
    reference = build(grouped_hybrid(), dtype=torch.float64, mla_implementation="expanded").train()
    reference(ids, labels=ids).loss.backward()
    other = twin(reference, mla_implementation=implementation).train()
    other(ids, labels=ids).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=name)


def test_bf16_absorbed_decode_stays_close_to_fp32():
    reference = build(deepseek_style())
    model = twin(reference)
    model.to(torch.bfloat16)
    ids = random_ids(2, 10)
    cache = DynamicCache(config=model.config)
    model(ids[:, :9], past_key_values=cache, use_cache=True)
    step = model(ids[:, 9:], past_key_values=cache, use_cache=True).logits
    assert step.dtype == torch.bfloat16 and cache.layers[0].keys.dtype == torch.bfloat16
    torch.testing.assert_close(step.float(), reference(ids).logits[:, 9:], rtol=0, atol=0.1)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_lora_on_kv_b_proj_falls_back_to_the_expanded_form():
    from peft import LoraConfig, get_peft_model

    model = build(deepseek_style())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["kv_b_proj"], init_lora_weights=False))
    ids = random_ids(1, 8)
    calls = record_paths(peft_model.base_model.model)
    cache = DynamicCache(config=model.config)
    peft_model(input_ids=ids[:, :7], past_key_values=cache, use_cache=True)
    step = peft_model(input_ids=ids[:, 7:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, peft_model(input_ids=ids).logits[:, 7:], rtol=0, atol=1e-5)
    assert not any(absorbed for _, absorbed in calls)  # the adapter's update is not in kv_b_proj.weight
    model.config.mla_implementation = "absorbed"
    with pytest.raises(ValueError, match="needs `kv_b_proj` to be a plain nn.Linear"):
        peft_model(input_ids=ids)


# ---------------------------------------------------------------------------------------------------------------
# Save, load


def test_save_and_load_round_trip(tmp_path):
    model = build(grouped_hybrid())
    model.save_pretrained(tmp_path)
    assert "mla_hfext.py" in {p.name for p in tmp_path.glob("*.py")}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_types == ["mla", "gqa", "mla"] and reloaded.config.mla_rope_key_heads == 2
    ids = random_ids(2, 9)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
