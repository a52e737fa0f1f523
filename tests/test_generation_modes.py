"""Every HfExt variant with every decoding mode of `generate`, with the dynamic and the static cache.

Each mode is checked against a reference it must reproduce token for token: greedy search without a cache (for
cached greedy, assisted decoding with another or the same model as draft, assisted sampling with top_k=1, and
prompt-lookup decoding), beam search without a cache, and seeded sampling without a cache. Contrastive search is not
here: transformers ships it as Hub code (`transformers-community/contrastive-search`), which these machines cannot
download. Two combinations are transformers' own limits, asserted on its Llama/Mistral as well: assisted and
prompt-lookup decoding need a croppable cache, which a static cache with sliding-window layers is not; prompt lookup
with a static cache overruns it (its size does not count the candidate tokens).
"""

import copy

import pytest
import torch
from conftest import hybrid_config, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_ext import HfExtConfig, HfExtForCausalLM
from hf_ext.hwfa import hwfa_config
from benchmarks.tasks.digit_canvas import build_processor

NEW_TOKENS = 12
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=None)


def _variant(name: str) -> HfExtConfig:
    if name == "gqa":
        return tiny_config(eos_token_id=None)
    if name == "hybrid":  # sliding RoPE layers, a full NoPE layer with log-n
        return hybrid_config(eos_token_id=None)
    if name in ("hwfa", "hwfa_rerope"):
        config = hwfa_config(name, num_hidden_layers=3, max_position_embeddings=16, sliding_window=4,
                             **({"rerope_window": 6} if name == "hwfa_rerope" else {}), **TINY)
        if name == "hwfa_rerope":
            config.rerope_mode = "rerope"
        return config
    if name in ("rerope", "leaky_rerope"):
        return tiny_config(eos_token_id=None, rerope_mode=name, rerope_window=6, rerope_leaky_factor=3.0)
    if name == "mla":  # DeepSeek's layout: one shared rotary key, low-rank queries
        return tiny_config(eos_token_id=None, attention_types=["mla"] * 3, kv_lora_rank=32, q_lora_rank=24,
                           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True)
    if name == "mla_hybrid":
        return tiny_config(eos_token_id=None, attention_types=["mla", "gqa", "mla"],
                           layer_types=["full_attention", "full_attention", "sliding_attention"], sliding_window=5,
                           kv_lora_rank=20, qk_nope_head_dim=4, qk_rope_head_dim=16, v_head_dim=16,
                           mla_rope_key_heads=2)
    raise KeyError(name)


VARIANTS = ["gqa", "hybrid", "hwfa", "hwfa_rerope", "rerope", "leaky_rerope", "mla", "mla_hybrid"]
HAS_SLIDING_LAYERS = {"hybrid", "hwfa", "hwfa_rerope", "mla_hybrid"}


def _model(config: HfExtConfig, seed: int = 0, attention: str = "sdpa") -> HfExtForCausalLM:
    config = copy.deepcopy(config)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = HfExtForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the initialiser's, so that tokens differ from step to step
        for name, parameter in model.named_parameters():
            if "self_attn" in name and parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    return model


def _generate(model, input_ids, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, pad_token_id=0, **kwargs)


def _prompt(length=8, seed=1):
    return torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_every_decoding_mode_reproduces_its_uncached_reference(variant, cache):
    config = _variant(variant)
    model, draft = _model(config), _model(tiny_config(eos_token_id=None), seed=1)
    ids = _prompt()
    lookup_ids = torch.cat([ids, ids[:, :5], ids[:, 2:6]], dim=-1)  # repeats, so prompt lookup proposes tokens
    greedy = _generate(model, ids, do_sample=False, use_cache=False)
    lookup_greedy = _generate(model, lookup_ids, do_sample=False, use_cache=False)
    beams = _generate(model, ids, num_beams=3, do_sample=False, use_cache=False)
    sampled = _generate(model, ids, do_sample=True, top_k=0, use_cache=False, seed=3)
    cached = {"cache_implementation": cache}
    cases = {
        "greedy": (lambda: _generate(model, ids, do_sample=False, **cached), greedy),
        "beam search": (lambda: _generate(model, ids, num_beams=3, do_sample=False, **cached), beams),
        "sampling": (lambda: _generate(model, ids, do_sample=True, top_k=0, seed=3, **cached), sampled),
    }
    if not (cache == "static" and variant in HAS_SLIDING_LAYERS):  # transformers: a static sliding cache can't crop
        cases.update({
            "assisted, another draft": (
                lambda: _generate(model, ids, do_sample=False, assistant_model=draft, **cached), greedy),
            "assisted, itself as draft": (
                lambda: _generate(model, ids, do_sample=False, assistant_model=model, **cached), greedy),
            "assisted sampling, top_k=1": (
                lambda: _generate(model, ids, do_sample=True, top_k=1, assistant_model=draft, **cached), greedy),
        })
    if cache == "dynamic":  # prompt lookup with a static cache: see test_transformers_own_limits
        cases["prompt lookup"] = (lambda: _generate(model, lookup_ids, do_sample=False, prompt_lookup_num_tokens=3),
                                  lookup_greedy)
    differing = [mode for mode, (run, expected) in cases.items() if not torch.equal(run(), expected)]
    assert differing == []


@torch.no_grad()
def test_transformers_own_limits_hold_for_its_models_too():
    """What the matrix above leaves out fails the same way on transformers' own Llama and Mistral."""
    mistral = MistralForCausalLM(MistralConfig(sliding_window=4, num_hidden_layers=2, **TINY)).eval()
    ids = _prompt()
    for model in (mistral, _model(_variant("hybrid"))):
        with pytest.raises(ValueError, match="cache that can be cropped"):
            _generate(model, ids, do_sample=False, assistant_model=model, cache_implementation="static")
    # Prompt lookup with a static cache overruns it when a candidate reaches past the cache's end (its size does not
    # count the candidates): transformers' Llama on this prompt. HfExt either fails the same way or decodes exactly.
    repetitive = torch.randint(3, 20, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **TINY)).eval()
    with pytest.raises(IndexError, match="out of bounds"):
        _generate(llama, repetitive, do_sample=False, prompt_lookup_num_tokens=3, cache_implementation="static")
    for variant in VARIANTS:
        if variant in HAS_SLIDING_LAYERS:
            continue
        model = _model(_variant(variant))
        try:
            out = _generate(model, repetitive, do_sample=False, prompt_lookup_num_tokens=3,
                            cache_implementation="static")
        except IndexError as error:
            assert "out of bounds" in str(error)
            continue
        assert torch.equal(out, _generate(model, repetitive, do_sample=False, use_cache=False)), variant


@pytest.mark.parametrize("variant", ["hybrid", "hwfa", "mla_hybrid"])
@torch.no_grad()
def test_a_padded_query_whose_window_holds_only_padding_attends_to_nothing(variant):
    """Eager attention and MLA's absorbed path: such a row's output must not depend on later tokens in the same
    forward (it used to average over all of them), so assisted decoding equals greedy with transformers' test mask."""
    model = _model(_variant(variant), attention="eager")
    ids = _prompt(7)
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0]])  # the row transformers' generation tests use
    logits = model(ids, attention_mask=mask).logits[0, -1]
    longer = torch.cat([ids, _prompt(4, seed=5)], dim=-1)
    longer_logits = model(longer, attention_mask=torch.cat([mask, torch.ones(1, 4, dtype=mask.dtype)], -1)).logits
    torch.testing.assert_close(longer_logits[0, 6], logits, atol=1e-5, rtol=0)
    common = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=False)
    assert torch.equal(model.generate(ids, assistant_model=model, **common), model.generate(ids, **common))


@pytest.mark.parametrize("variant", ["rerope", "hwfa_rerope", "leaky_rerope"])
@torch.no_grad()
def test_a_generated_pad_token_is_not_padding_for_the_draft_model(variant):
    """transformers drops an all-ones mask; the draft's own generate then took each generated pad token for padding,
    a hole in the sequence that ReRoPE refuses. Greedy here emits the pad id within the first tokens."""
    model = _model(_variant(variant))
    ids = _prompt()
    greedy = _generate(model, ids, do_sample=False)
    pad = int(greedy[0, ids.shape[1] + 1])  # a token greedy search produces: declare it the pad token
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  pad_token_id=pad, do_sample=False)
    assert torch.equal(model.generate(ids, assistant_model=model, **common), model.generate(ids, **common))


@pytest.mark.parametrize("layout", ["rope_tie_v1", "rope_tie_v2", "mrope"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_image_prompts_decode_the_same_in_every_mode(layout, cache):
    processor = build_processor(patch_size=2)
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, position_layout=layout, pad_token_id=0, eos_token_id=None,
                  bos_token_id=None, initializer_range=0.25, **processor.model_config_kwargs)
    torch.manual_seed(0)
    model = HfExtForCausalLM(HfExtConfig(**fields)).eval()
    torch.manual_seed(1)
    draft = HfExtForCausalLM(HfExtConfig(**fields)).eval()
    batch = processor(text=["what is <image> at row 1 col 2 ? 1 2 1 2"],
                      images=[[torch.rand(4, 6, generator=torch.Generator().manual_seed(0))]])
    markers = [processor.model_config_kwargs[key] for key in ("image_token_id", "image_start_token_id",
                                                              "image_end_token_id")]
    common = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, suppress_tokens=markers, pad_token_id=0,
                  do_sample=False)
    greedy = model.generate(**batch, use_cache=False, **common)
    modes = [{}, {"assistant_model": draft}, {"assistant_model": model}]
    if cache == "dynamic":  # prompt lookup with a static cache: see test_transformers_own_limits_hold_for_its_models_too
        modes.append({"prompt_lookup_num_tokens": 3})
    for extra in modes:
        assert torch.equal(model.generate(**batch, cache_implementation=cache, **extra, **common), greedy), extra


@torch.no_grad()
def test_rerope_on_a_sliding_layer_refuses_the_static_cache_and_decodes_with_the_dynamic_one():
    """A sliding layer wider than the ReRoPE window applies ReRoPE; a static sliding cache keeps its keys in a ring
    buffer, out of order, so that combination is refused rather than decoded wrong."""
    model = _model(hybrid_config(eos_token_id=None, rerope_mode="rerope", rerope_window=3))
    ids = _prompt()
    with pytest.raises(ValueError, match="sliding-window layer \\(layer 0\\) needs the dynamic cache"):
        _generate(model, ids, do_sample=False, cache_implementation="static")
    assert torch.equal(_generate(model, ids, do_sample=False), _generate(model, ids, do_sample=False, use_cache=False))
