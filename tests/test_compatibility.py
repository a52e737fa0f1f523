"""What works across the supported range of transformers: the cache under either name (`cache` from 5.24 on,
`past_key_values` before), greedy generation of a tiny HfExt model, and `hfx_rerope` on a tiny Llama."""

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

import hf_ext
from hf_ext.models.hfext.modeling_hfext import CACHE_NAME

pytestmark = pytest.mark.smoke

INSTALLED_CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _model() -> hf_ext.HfExtForCausalLM:
    torch.manual_seed(0)
    return hf_ext.HfExtForCausalLM(tiny_config()).eval()


def test_the_cache_goes_by_the_installed_releases_name():
    assert CACHE_NAME == INSTALLED_CACHE_NAME
    out = _model()(torch.tensor([[5, 6, 7]]), use_cache=True)
    assert isinstance(out[INSTALLED_CACHE_NAME], Cache)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_decoding_from_a_cache_passed_under_either_name_equals_the_full_forward(name):
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    model(ids[:, :4], use_cache=True, **{name: cache})
    steps = [model(ids[:, t: t + 1], use_cache=True, **{name: cache}).logits for t in (4, 5)]
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], rtol=1e-5, atol=1e-6)


def test_a_cache_under_both_names_is_refused():
    model, cache = _model(), DynamicCache()
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(torch.tensor([[5]]), cache=cache, past_key_values=cache)


def test_greedy_generate_with_cache_equals_without():
    model = _model()
    prompt = torch.tensor([[1, 5, 6, 7]])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **settings))


@pytest.mark.parametrize("implementation", ["hfx_rerope", "hfx_leaky_rerope"])
def test_rerope_on_a_tiny_llama_equals_sdpa_inside_the_window_and_decodes_like_its_prefill(implementation):
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).eval()

    def with_rerope(window: int) -> LlamaForCausalLM:
        model = LlamaForCausalLM._from_config(hf_ext.rerope_config(config, rerope_window=window, logn_scaling=False),
                                              attn_implementation=implementation)
        model.load_state_dict(plain.state_dict())
        return model.eval()

    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = plain(ids).logits
    # A window covering the sequence changes no distance: exactly RoPE.
    torch.testing.assert_close(with_rerope(32)(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # A shorter window caps (or compresses) the long distances; decoding from the cache reproduces the prefill.
    model = with_rerope(6)
    prefill = model(ids).logits
    assert not torch.allclose(prefill, expected, atol=1e-3)
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], use_cache=True, **{INSTALLED_CACHE_NAME: prefix[INSTALLED_CACHE_NAME]}).logits
    torch.testing.assert_close(step[:, -1], prefill[:, -1], rtol=1e-4, atol=1e-5)
