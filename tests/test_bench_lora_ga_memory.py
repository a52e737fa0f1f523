"""Smoke test of benchmarks/lora_ga_init_memory.py: its quick mode (a tiny random Llama, seconds) end to end.

Structure only: the keys exist, the measured numbers are positive, the checks hold, the rows render in RESULTS.md.
Nothing asserts on a peak, a time or the goal being met (a tiny model says nothing about them).
"""

import json
from pathlib import Path

import pytest

from hf_ext import benchmarking

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NAME = "lora_ga_init_memory"


@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark(NAME)


@pytest.fixture(scope="module")
def result(bench):
    return bench.main(quick=True)


def test_quick_run_structure(bench, result):
    assert result["benchmark"] == NAME and result["quick"] is True
    assert json.loads((BENCHMARKS / "results" / "quick" / f"{NAME}.json").read_text())["benchmark"] == NAME
    settings = result["settings"]
    assert settings["model"] == "tiny-llama" and settings["target_layers"] == 7 * bench.TINY_MODEL["num_hidden_layers"]
    assert settings["candidate_gradient_passes"] == 2 + 2 * settings["power_iterations"] == 10

    assert set(result["metrics"]) == {"init_peak_memory", "init_seconds"}
    for metric in result["metrics"].values():
        for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed"):
            assert key in metric
        assert isinstance(metric["candidate"], float) and isinstance(metric["peer"], float)
        assert metric["candidate"] > 0 and metric["peer"] > 0 and metric["speed_ratio"] > 0
    memory = result["metrics"]["init_peak_memory"]
    assert memory["unit"] == "MiB" and memory["min_memory_ratio"] == bench.MEMORY_GOAL
    assert memory["memory_ratio"] == pytest.approx(memory["peer_peak_bytes"] / memory["candidate_peak_bytes"])
    assert memory["passed"] in (True, False)
    repeats = settings["memory_repeats"]
    assert len(memory["candidate_peak_bytes_samples"]) == len(memory["peer_peak_bytes_samples"]) == repeats
    assert result["metrics"]["init_seconds"]["passed"] is None

    tables = result["tables"]
    assert tables["target_gradients_bytes"] > 0 and tables["target_gradients_mib"] > 0
    for side in ("candidate", "peer"):
        assert len(tables["peak_bytes_samples"][side]) == len(tables["init_seconds_samples"][side]) == repeats
        assert all(seconds > 0 for seconds in tables["init_seconds_samples"][side])
        assert tables["extra_peak_mib"][side] > 0 and tables["init_seconds"][side] > 0


def test_quick_run_checks(bench, result):
    checks = result["checks"]
    assert checks["same_targets"] is True and checks["targets"] == result["settings"]["target_layers"]
    for side in ("candidate", "peer"):
        assert 0 <= checks[f"{side}_logits_max_abs_diff"] <= bench.LOGITS_TOLERANCE
    assert checks["logits_passed"] is True and checks["passed"] is True
    agreement = checks["a_rows_vs_peft"]
    assert len(agreement["layers"]) == len(bench.COSINE_MODULES) * bench.TINY_MODEL["num_hidden_layers"]
    for layer in agreement["layers"].values():
        assert 0 < layer["mean_abs_row_cosine"] <= 1 + 1e-5 and 0 < layer["subspace_overlap"] <= 1 + 1e-5
        assert len(layer["row_cosines"]) == result["settings"]["rank"]


def test_results_table_renders(tmp_path, result):
    assert result["markdown_tables"] and all(table.count("|") > 10 for table in result["markdown_tables"])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | init_peak_memory |" in text and f"| {NAME} | init_seconds |" in text
    assert "memory_ratio >= 2.0" in text and f"## {NAME}" in text
