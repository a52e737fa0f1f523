"""Smoke test of benchmarks/mla_decode_speed.py.

``main(quick=True)`` runs once for the module (contexts 256 and 512, seconds; results go to ``results/quick/``, which
never touches RESULTS.md); the tests check the result's structure and its ``checks``: HfExt's MLA and transformers'
DeepseekV3Attention give the same logits on a prefill and on cached decode steps, "auto" decodes in the absorbed
form and prefills in the expanded one, and the caches hold the bytes `kv_cache_bytes_per_token` predicts. Nothing
asserts on wall-clock time or on a goal being met: a loaded machine may miss a speed goal in quick mode.
"""

import json
from pathlib import Path

import pytest
import torch

import hf_ext
from hf_ext import benchmarking

NAME = "mla_decode_speed"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark(NAME)


@pytest.fixture(scope="module")
def result(bench):
    return bench.main(quick=True)


def test_decoder_restarts_from_the_context_every_call(bench):
    """Each call crops the cache back to the context: two calls decode the same tokens from the same state."""
    model = {**bench.MODEL, "hidden_size": 128, "intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "kv_lora_rank": 64, "vocab_size": 97}
    hfext, deepseek = bench.build_models(model)
    ids = torch.randint(97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for decoder in (bench.Decoder(hfext, ids, 3), bench.Decoder(deepseek, ids, 3)):
            first_tokens, first_logits = decoder.run()
            assert decoder.cache.get_seq_length() == 12 + 3
            second_tokens, second_logits = decoder.run()
            assert decoder.cache.get_seq_length() == 12 + 3 and first_tokens.shape == (1, 3)
            torch.testing.assert_close(second_tokens, first_tokens, rtol=0, atol=0)
            torch.testing.assert_close(second_logits, first_logits, rtol=0, atol=0)
            assert decoder.cache_bytes == 12 * hf_ext.kv_cache_bytes_per_token(decoder.model.config)


def test_reference_configs_have_the_models_width(bench):
    for name, kv_heads in bench.REFERENCE_HEADS.items():
        config = bench.reference_config(kv_heads)
        assert config.num_attention_heads * config.head_dim == bench.MODEL["hidden_size"]
        assert config.num_hidden_layers == bench.MODEL["num_hidden_layers"]
    # The fused CPU sdpa kernel needs v_head_dim == qk_nope + qk_rope (see the module docstring).
    assert bench.MODEL["v_head_dim"] == bench.MODEL["qk_nope_head_dim"] + bench.MODEL["qk_rope_head_dim"]


def test_quick_run(bench, result):
    assert result["benchmark"] == NAME and result["quick"] is True and result["partial"] is False
    assert json.loads((BENCHMARKS / "results" / "quick" / f"{NAME}.json").read_text())["benchmark"] == NAME
    assert (BENCHMARKS / "results" / "quick" / f"{NAME}.png").is_file()
    settings = result["settings"]
    assert settings["threads"] == torch.get_num_threads()
    contexts = sorted(int(c) for c in settings["contexts"])
    assert contexts == sorted(bench.QUICK["contexts"])

    checks = result["checks"]
    assert checks["passed"] is True and checks["failures"] == []
    assert checks["mla_implementation_setting"] == "auto"
    validation = checks["validation"]
    assert validation["passed"] and validation["greedy_tokens_equal"]
    assert validation["max_abs_logit_diff_prefill"] <= bench.LOGIT_TOLERANCE
    assert validation["max_abs_logit_diff_decode"] <= bench.LOGIT_TOLERANCE
    # The absorbed kernel ran in every layer at every decode step, and not in the prefill.
    assert validation["absorbed_kernel_calls_prefill"] == 0
    assert validation["absorbed_kernel_calls_decode"] == bench.MODEL["num_hidden_layers"] * validation["steps"]
    for context in contexts:
        choice = checks["mla_implementation"][str(context)]
        assert choice["ok"] and all(choice["decode_absorbed"]) and not any(choice["prefill_absorbed"])
        record = checks["contexts"][str(context)]
        assert record["passed"] and record["greedy_tokens_equal"]
        assert record["max_abs_logit_diff_prefill_last"] <= bench.LOGIT_TOLERANCE
        assert record["max_abs_logit_diff_decode"] <= bench.LOGIT_TOLERANCE
        assert record["hfext_cache_matches_helper"] and record["deepseek_cache_matches_helper"]
    for reference in checks["reference_caches"].values():
        assert reference["matches_helper"]

    metrics = result["metrics"]
    for context in contexts:
        decode, prefill = metrics[f"decode_{context}"], metrics[f"prefill_{context}"]
        for metric in (decode, prefill):
            for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed"):
                assert key in metric, key
            assert isinstance(metric["candidate"], float) and isinstance(metric["peer"], float)
        assert decode["work_per_call"] == settings["decode_steps"] and decode["unit"] == "tokens/s"
        assert decode["repeats"] == settings["contexts"][str(context)]["decode_rounds"]
        assert "candidate_peak_bytes" in decode and "peer_peak_bytes" in decode
        # Goals: decode only at 8192 (not a quick context), prefill at every context.
        assert decode["goal"] is None and decode["passed"] is None
        assert prefill["work_per_call"] == context
        assert prefill["min_speed_ratio"] == pytest.approx(1 / 1.1) and prefill["max_time_ratio"] == 1.1
        assert prefill["time_ratio"] == pytest.approx(1 / prefill["speed_ratio"])
        assert prefill["passed"] in (True, False)

    kv = result["tables"]["kv_bytes_per_token"]
    model = bench.MODEL
    float_bytes, layers = 4, model["num_hidden_layers"]
    assert kv["hfext_mla"]["helper_bytes_per_token"] == (
        (model["kv_lora_rank"] + model["qk_rope_head_dim"]) * layers * float_bytes)
    assert kv["deepseek"]["helper_bytes_per_token"] == kv["hfext_mla"]["helper_bytes_per_token"]
    assert kv["mha"]["helper_bytes_per_token"] == 2 * 16 * 64 * layers * float_bytes
    assert kv["gqa"]["helper_bytes_per_token"] == 2 * 4 * 64 * layers * float_bytes
    for name in ("hfext_mla", "deepseek", "mha", "gqa"):
        assert kv[name]["measured_bytes_per_token"] == kv[name]["helper_bytes_per_token"]
    for name in ("deepseek", "mha", "gqa"):
        row = metrics[f"kv_bytes_per_token_vs_{name}"]
        assert row["speed_ratio"] == pytest.approx(kv[name]["helper_bytes_per_token"] / kv["hfext_mla"][
            "helper_bytes_per_token"]) and row["passed"] is None
    assert result["passed"] == all(m["passed"] for m in metrics.values() if m["passed"] is not None)


def test_results_table_renders(tmp_path, result):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | decode_512 |" in text and f"| {NAME} | prefill_256 |" in text
    assert f"| {NAME} | kv_bytes_per_token_vs_mha |" in text
    assert f"## {NAME}" in text and "| 512 |" in text
