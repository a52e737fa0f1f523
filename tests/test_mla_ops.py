"""MLA kernels (hf_ext.ops.mla): the expanded form against torch's scaled_dot_product_attention on explicitly built
per-head keys, and the absorbed form against the expanded one (float64 and float32, prefill and every decode step)."""

import pytest
import torch
import torch.nn.functional as F

from hf_ext.ops.mla import mla_attention_absorbed, mla_attention_expanded

B, H, S, D_NOPE, D_ROPE, D_C, D_V = 2, 4, 7, 16, 8, 24, 12


def _inputs(groups=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(q_nope=randn(B, H, S, D_NOPE), q_rope=randn(B, H, S, D_ROPE), c_kv=randn(B, S, D_C),
                k_rope=randn(B, groups, S, D_ROPE), w_uk=randn(H, D_NOPE, D_C) / D_C**0.5,
                w_uv=randn(H, D_V, D_C) / D_C**0.5)


def _causal(s, t, dtype):
    return torch.full((s, t), float("-inf"), dtype=dtype).triu(t - s + 1)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_expanded_equals_sdpa_on_explicit_per_head_keys(groups):
    x = _inputs(groups)
    scale = (D_NOPE + D_ROPE) ** -0.5
    keys = torch.cat([torch.einsum("btc,hdc->bhtd", x["c_kv"], x["w_uk"]),
                      x["k_rope"].repeat_interleave(H // groups, dim=1)], dim=-1)
    values = torch.einsum("btc,hdc->bhtd", x["c_kv"], x["w_uv"])
    queries = torch.cat([x["q_nope"], x["q_rope"]], dim=-1)
    expected = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale)
    result = mla_attention_expanded(**x, scale=scale, mask=_causal(S, S, torch.float64))
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("groups", [1, 2])
def test_absorbed_equals_expanded_in_prefill_and_at_every_decode_step(groups, dtype, tolerance):
    x = _inputs(groups, dtype)
    scale = (D_NOPE + D_ROPE) ** -0.5
    full = mla_attention_expanded(**x, scale=scale, mask=_causal(S, S, dtype))
    torch.testing.assert_close(mla_attention_absorbed(**x, scale=scale, mask=_causal(S, S, dtype)), full,
                               rtol=0, atol=tolerance)
    for step in range(1, S + 1):  # decode: one query against the cached latents of positions 0..step-1
        one = {**x, "q_nope": x["q_nope"][:, :, step - 1 : step], "q_rope": x["q_rope"][:, :, step - 1 : step],
               "c_kv": x["c_kv"][:, :step], "k_rope": x["k_rope"][:, :, :step]}
        torch.testing.assert_close(mla_attention_absorbed(**one, scale=scale), full[:, :, step - 1 : step],
                                   rtol=0, atol=tolerance)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="number of heads \\(4\\) must be a multiple of the rotary key groups \\(3\\)"):
        mla_attention_absorbed(**_inputs(groups=3), scale=1.0)
    x = _inputs()
    with pytest.raises(ValueError, match="w_uk must be"):
        mla_attention_expanded(**{**x, "w_uk": x["w_uk"][:, :, :-1]}, scale=1.0)
