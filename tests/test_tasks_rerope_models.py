"""The models of the ReRoPE speed benchmark (benchmarks/tasks/rerope_models.py): the dense two-matrix reference
computes what hfx_rerope computes, and decoding from a prefilled cache restarts from the prompt every call."""

import pytest
import torch

from benchmarks.tasks.rerope_models import LOGIT_TOLERANCE, Decoder, build_models, dense_peak_bytes, validate

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 101, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "initializer_range": 0.25}


@pytest.fixture(scope="module")
def models():
    return build_models(shapes=TINY)


def test_dense_reference_and_hfext_agree_with_hfx_rerope(models):
    with torch.inference_mode():
        checks = validate(models, length=40, window=8, logn_length=16)
    assert checks["max_abs_logit_diff_dense_vs_hfx_rerope"] <= LOGIT_TOLERANCE
    assert checks["max_abs_logit_diff_hfext_rerope_vs_hfx_rerope_without_logn"] <= LOGIT_TOLERANCE
    assert checks["max_abs_logit_diff_hfx_rerope_vs_sdpa"] > 100 * LOGIT_TOLERANCE  # the ReRoPE path really ran


def test_decoder_repeats_the_same_tokens_from_the_prompt(models):
    prompt = torch.randint(101, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        decoder = Decoder(models["hfx_rerope"], prompt, steps=5)
        first, second = decoder(), decoder()
        full = models["hfx_rerope"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                             min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert first.shape == (1, 5) and torch.equal(first, second)
    assert torch.equal(first, full[:, prompt.shape[1] + 1:])  # after the prefill's own first token


def test_dense_peak_estimate_grows_quadratically():
    assert dense_peak_bytes(2048, 9) == 4 * dense_peak_bytes(1024, 9)
