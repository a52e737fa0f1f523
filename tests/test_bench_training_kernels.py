"""Smoke tests of benchmarks/lion_step_speed.py and benchmarks/tail_capped_loss_memory.py.

Each script's ``main(quick=True)`` runs once per module (tiny sizes, seconds; results go to ``results/quick/``,
which never touches RESULTS.md); the tests check the result's structure and its ``checks``. Nothing asserts on
wall-clock time or on a goal being met: a loaded machine may miss a speed goal in quick mode.
"""

import json
from pathlib import Path

import pytest
import torch

from hf_ext import benchmarking

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return benchmarking.load_benchmark(name)


def _assert_common_structure(result: dict, name: str) -> None:
    assert result["benchmark"] == name and result["quick"] is True
    assert json.loads((BENCHMARKS / "results" / "quick" / f"{name}.json").read_text())["benchmark"] == name
    assert result["markdown_tables"] and all(table.count("|") > 10 for table in result["markdown_tables"])
    for metric in result["metrics"].values():
        for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed"):
            assert key in metric
        assert metric["passed"] in (True, False, None)
    # The rows render in the RESULTS.md format (candidate and peer are numbers).
    assert all(isinstance(m["candidate"], float) and isinstance(m["peer"], float) for m in result["metrics"].values())


# ---------------------------------------------------------------------------------------------------------------
# Lion


@pytest.fixture(scope="module")
def lion_bench():
    return _load("lion_step_speed")


@pytest.fixture(scope="module")
def lion_result(lion_bench):
    return lion_bench.main(quick=True)


def test_smollm2_parameter_count(lion_bench):
    shapes = lion_bench.parameter_shapes(lion_bench.SMOLLM2_135M)
    assert sum(torch.Size(shape).numel() for _, shape in shapes) == 134_515_008
    assert len(shapes) == 1 + 30 * 9 + 1 and shapes[0] == ("embed_tokens", (49152, 576))


def test_state_bytes_and_momentum(lion_bench):
    params = lion_bench.build_parameters(lion_bench.QUICK_MODEL)
    numel = sum(p.numel() for p in params)
    lion, adamw = lion_bench.make_optimizer("lion_fused", params), lion_bench.make_optimizer("adamw_fused", params)
    lion.step(), adamw.step()
    assert lion_bench.state_bytes(lion) == 4 * numel
    assert lion_bench.state_bytes(adamw) == 8 * numel + 4 * len(params)  # exp_avg, exp_avg_sq, 0-d fp32 step
    assert lion_bench.momentum_of(lion, params[0]).shape == params[0].shape


def test_lion_quick_run(lion_bench, lion_result):
    _assert_common_structure(lion_result, "lion_step_speed")
    checks = lion_result["checks"]
    assert checks["passed"] is True
    for peer in ("lion_foreach", "lion_pytorch", "bitsandbytes"):
        assert checks[f"fused_vs_{peer}"]["params_bit_identical"] is True
        assert checks[f"fused_vs_{peer}"]["momenta_bit_identical"] is True
    assert checks["fused_vs_lion_pytorch_foreach"]["max_abs_param_diff"] < 1e-6  # lerp: close, maybe not equal
    metrics = lion_result["metrics"]
    assert {name for name, *_ in lion_bench.COMPARISONS} <= set(metrics)
    goal = metrics["lion_fused_vs_adamw_fused"]
    assert goal["min_speed_ratio"] == lion_bench.TIME_GOAL and goal["passed"] in (True, False)
    state = metrics["state_bytes_vs_adamw_fused"]
    assert state["passed"] is True and 2.0 <= state["speed_ratio"] < 2.01
    table = lion_result["tables"]["optimizers"]
    assert set(table) == set(lion_bench.OPTIMIZERS)
    numel = lion_result["settings"]["parameters"]
    assert table["lion_fused"]["nominal_bytes_per_step"] == 20 * numel
    assert table["adamw_fused"]["nominal_bytes_per_step"] == 28 * numel
    bandwidth = lion_result["tables"]["reference_bandwidth"]
    assert bandwidth["copy_bytes_per_second"] > 0 and bandwidth["inplace_add_bytes_per_second"] > 0
    assert table["lion_fused"]["fraction_of_inplace_add_bandwidth"] > 0
    assert metrics["lion_fused_bandwidth_vs_copy"]["speed_ratio"] > 0
    assert set(lion_result["tables"]["compile"]["first_step_seconds"]) == {"lion_fused", "lion_foreach"}
    assert lion_result["settings"]["threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------------------------------------------------
# Tail-capped loss


@pytest.fixture(scope="module")
def loss_bench():
    return _load("tail_capped_loss_memory")


@pytest.fixture(scope="module")
def loss_result(loss_bench):
    return loss_bench.main(quick=True)


def test_three_losses_agree_on_tiny_inputs(loss_bench):
    checks = loss_bench.check_agreement(tokens=40, vocab=300)
    assert checks["passed"] is True
    for name in ("fused_vs_naive_gamma_0.1", "fused_gamma_0_vs_transformers_ce"):
        for part in ("loss", "grad_hidden", "grad_weight"):
            assert checks[name][f"{part}_relative_difference"] <= loss_bench.GRAD_TOLERANCE
    low, high = checks["tailr_weight_range"]
    assert low < 0.1 < 0.9 < high  # the check covers small and large TaiLr weights


def test_naive_tailr_at_gamma_zero_is_cross_entropy(loss_bench):
    hidden, weight, targets = loss_bench.make_inputs(16, 50, torch.float32)
    naive = loss_bench.naive_tailr_loss(hidden, weight, targets, gamma=0.0)
    ce = loss_bench.transformers_ce_loss(hidden, weight, targets)
    torch.testing.assert_close(naive, ce, rtol=1e-6, atol=1e-6)


def test_memory_estimate_skips_what_does_not_fit(loss_bench):
    naive_16k = loss_bench.estimated_peak_bytes("naive", 16384, 49152, torch.float32)
    fused_16k = loss_bench.estimated_peak_bytes("fused", 16384, 49152, torch.float32)
    assert naive_16k > 9 * 2**30 > 2**30 > fused_16k
    assert fused_16k == loss_bench.estimated_peak_bytes("fused", 2048, 49152, torch.float32)  # flat in N


def test_tail_capped_quick_run(loss_bench, loss_result):
    _assert_common_structure(loss_result, "tail_capped_loss_memory")
    assert loss_result["checks"]["passed"] is True
    metrics = loss_result["metrics"]
    for dtype in ("float32", "bfloat16"):
        label = f"{dtype}_256"
        for suffix in ("fused_vs_transformers_ce", "fused_vs_naive_time", "peak_memory_fused_vs_naive",
                       "peak_memory_fused_vs_transformers_ce", "fused_chunk256_vs_transformers_ce"):
            assert f"{label}_{suffix}" in metrics
        memory = metrics[f"{label}_peak_memory_fused_vs_naive"]
        assert memory["candidate_peak_bytes"] > 0 and memory["peer_peak_bytes"] > 0
        assert memory["memory_ratio"] == pytest.approx(memory["peer_peak_bytes"] / memory["candidate_peak_bytes"])
    # Goals apply to fp32 only; bf16 rows are informational.
    assert metrics["float32_256_fused_vs_transformers_ce"]["min_speed_ratio"] == pytest.approx(1 / 1.3)
    assert metrics["float32_256_peak_memory_fused_vs_naive"]["min_memory_ratio"] == pytest.approx(1 / 0.3)
    assert metrics["bfloat16_256_fused_vs_transformers_ce"]["passed"] is None
    entry = loss_result["tables"]["float32"]["256"]
    assert set(entry) == set(loss_bench.METHODS)
    assert all(entry[m]["median_seconds"] > 0 and entry[m]["peak_bytes"] > 0 for m in loss_bench.METHODS)
    assert not loss_result["skipped"]


def test_results_table_renders_both(tmp_path, lion_result, loss_result):
    (tmp_path / "results").mkdir()
    for result in (lion_result, loss_result):
        (tmp_path / "results" / f"{result['benchmark']}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert "| lion_step_speed | lion_fused_vs_adamw_fused |" in text
    assert "| tail_capped_loss_memory | float32_256_peak_memory_fused_vs_naive |" in text
    assert "## lion_step_speed" in text and "## tail_capped_loss_memory" in text
