"""Smoke test of benchmarks/scheduler_step_overhead.py.

``main(quick=True)`` runs once for the module (N = 50, 5 rounds, seconds; results go to ``results/quick/``, which
never touches RESULTS.md); the tests check the result's structure and its ``checks`` (our schedulers reproduce
FlowMatchEuler, DDPM and DDIM from the same start). Nothing asserts on wall-clock time or on a goal being met: a
loaded machine may miss a speed goal in quick mode.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from hf_ext import benchmarking

NAME = "scheduler_step_overhead"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark(NAME)


@pytest.fixture(scope="module")
def result(bench):
    return bench.main(quick=True)


def test_sampling_run_is_one_set_timesteps_and_a_step_per_timestep(bench):
    """The timed call: set_timesteps(N), then step() at every scheduler.timesteps (2N − 1 for Heun)."""
    for pair, calls in (("reflow_euler_vs_flow_match_euler", 6), ("reflow_heun_vs_flow_match_heun", 11),
                        ("udm_vs_ddpm", 6)):
        for run in bench.make_runs(pair, [1, 2, 4, 4], 6):
            counted = []
            step = run.scheduler.step
            run.scheduler.step = lambda *args, _step=step, **kwargs: counted.append(1) or _step(*args, **kwargs)
            sample = run()
            assert len(counted) == calls == len(run.scheduler.timesteps) and sample.shape == (1, 2, 4, 4)


def test_ddpm_runs_are_repeatable(bench):
    """The generator is re-seeded per run: two runs of one scheduler draw the same noise."""
    candidate, peer = bench.make_runs("udm_vs_ddpm", [1, 2, 4, 4], 5)
    torch.testing.assert_close(candidate(), candidate(), rtol=0, atol=0)
    torch.testing.assert_close(peer.repeated(3)(), peer(), rtol=0, atol=0)
    assert isinstance(peer.scheduler, DDPMScheduler)


def test_quick_run(bench, result):
    assert result["benchmark"] == NAME and result["quick"] is True
    assert json.loads((BENCHMARKS / "results" / "quick" / f"{NAME}.json").read_text())["benchmark"] == NAME
    assert result["markdown_tables"] and all(table.count("|") > 10 for table in result["markdown_tables"])
    settings = result["settings"]
    assert settings["threads"] == torch.get_num_threads() and settings["rounds"] % 2 == 1

    checks = result["checks"]
    assert checks["passed"] is True and checks["failures"] == []
    expected = {f"{pair}_{size}_n{steps}" for pair in bench.PAIRS for size in settings["sizes"]
                for steps in settings["steps"]}
    assert set(checks["pairs"]) == expected
    for name, record in checks["pairs"].items():
        assert record["candidate_step_calls"] == record["peer_step_calls"]
        if record["required"]:
            assert record["max_abs_diff"] <= bench.EQUALITY_TOLERANCE, name
        else:  # Heun: recorded only, but still the same sampler up to rounding
            assert name.startswith("reflow_heun") and record["max_abs_diff"] < 1e-3

    metrics = result["metrics"]
    assert set(metrics) == expected
    for name, metric in metrics.items():
        for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed", "time_ratio",
                    "candidate_seconds_per_run", "peer_seconds_per_run", "runs_per_call"):
            assert key in metric, (name, key)
        # The rows render in the RESULTS.md format (candidate and peer are numbers).
        assert isinstance(metric["candidate"], float) and isinstance(metric["peer"], float)
        assert metric["passed"] in (True, False)
        assert metric["min_speed_ratio"] == pytest.approx(1 / 1.1) and metric["max_time_ratio"] == 1.1
        assert metric["time_ratio"] == pytest.approx(1 / metric["speed_ratio"])
        assert metric["passed"] == (metric["time_ratio"] <= 1.1 + 1e-12)
        assert metric["repeats"] == settings["rounds"] and len(metric["candidate_seconds"]) == settings["rounds"]
        step_calls = 2 * metric["steps"] - 1 if metric["pair"].startswith("reflow_heun") else metric["steps"]
        assert metric["candidate_step_calls"] == metric["peer_step_calls"] == step_calls
        assert metric["candidate_seconds_per_run"] == pytest.approx(
            metric["candidate_median_seconds"] / metric["runs_per_call"])
    assert result["passed"] == all(m["passed"] for m in metrics.values())


def test_results_table_renders(tmp_path, result):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | reflow_euler_vs_flow_match_euler_tiny_n50 |" in text
    assert f"| {NAME} | udm_vs_ddim_eta0.5_latent_n50 |" in text
    assert f"## {NAME}" in text
