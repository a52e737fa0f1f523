"""Smoke tests of benchmarks/reflow_quality.py: its helpers (Fréchet distance, path/chord ratio) and the quick mode
(tiny models on 8 Gaussians and the 8×8 digits, every method and step count) end to end.

Structure only: the keys exist, the numbers are finite, DDIM and UDM agree, the plot and JSON are written, the rows
render in RESULTS.md. Nothing asserts on a distance level or the goal being met.
"""

import json
import math

import numpy as np
import pytest
import torch

from hf_ext import benchmarking

NAME = "reflow_quality"


@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark(NAME)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    pytest.importorskip("sklearn")
    directory = tmp_path_factory.mktemp("benchmarks")
    threads = torch.get_num_threads()
    try:
        result = bench.run(bench.QUICK, quick=True, benchmarks_dir=directory)
    finally:
        torch.set_num_threads(threads)  # run() picks one thread for the benchmark; leave other tests as they were
    return result, directory


def test_frechet_distance(bench):
    generator = np.random.default_rng(0)
    a = generator.normal(size=(4000, 3))
    assert bench.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4I) in d = 3: |m|² + tr(I + 4I − 2·2I) = |m|² + 3
    shifted = 2 * generator.normal(size=(200_000, 3)) + np.array([1.0, 0.0, 2.0])
    reference = generator.normal(size=(200_000, 3))
    assert bench.frechet_distance(reference, shifted) == pytest.approx(5.0 + 3.0, rel=0.02)
    # a singular covariance (a constant feature) stays finite
    constant = np.concatenate([a[:, :2], np.zeros((len(a), 1))], axis=1)
    assert math.isfinite(bench.frechet_distance(constant, a))


def test_path_length_ratio(bench):
    start, end = torch.zeros(5, 2), torch.ones(5, 2)
    straight = [start + f * (end - start) for f in (0.0, 0.25, 0.5, 1.0)]
    assert bench.path_length_ratio(straight) == pytest.approx(1.0)
    corner = [start, torch.tensor([[1.0, 0.0]]).expand(5, 2), end]
    assert bench.path_length_ratio(corner) == pytest.approx(2 / math.sqrt(2))


def test_quick_run_structure(bench, quick):
    result, _ = quick
    settings = result["settings"]
    assert result["benchmark"] == NAME and result["quick"] is True
    steps = [str(n) for n in settings["steps"]]
    for key, headline in (("toy", "sw"), ("digits", "fd")):
        table = result["tables"][key]
        assert table["headline_distance"] == headline
        assert set(table["methods"]) == set(bench.METHODS)
        for method, record in table["methods"].items():
            assert list(record["distance"]) == steps and record["nfe"] == {n: int(n) for n in steps}
            for distances in record["distance"].values():
                assert set(distances) == ({"sw"} if key == "toy" else {"fd", "mmd"})
                assert all(math.isfinite(value) and value >= 0 for value in distances.values())
            assert record["finite"] is True and record["path_length_ratio"] >= 1 - 1e-9
            if method in bench.FLOW_METHODS:
                assert math.isfinite(record["straightness"]) and record["straightness"] >= 0
            else:
                assert record["straightness"] is None
        training = table["training"]
        for method in bench.METHODS:
            assert training[method]["finite"] and training[method]["steps"] == settings[key][
                {"rf1": "rf", "ddim": "rf", "rf2": "reflow", "rf2_distill": "distill"}[method]]["max_steps"]
            assert math.isfinite(training[method]["loss_last_10pct"]) and training[method]["seconds"] > 0
        assert training["rf2_pairs"]["nfe_per_pair"] == 2 * settings[key]["pair_steps"] - 1
        assert training["rf2_distill_pairs"]["pairs"] == settings[key]["pairs"]
        assert all(math.isfinite(v) for v in table["floors"].values() if not isinstance(v, list))

        check = result["checks"][key]
        assert check["all_finite"] is True
        ddim = check["ddim_vs_udm"]
        assert ddim["identical"] is True and ddim["alphas_cumprod_equal"] is True
        assert ddim["udm_default_within_1e-4"] is True and list(ddim["per_steps"]) == list(settings["steps"])
        assert ddim["per_steps"][1]["timesteps"] == [settings["epsilon_scheduler"]["num_train_timesteps"] - 1]
    assert 0 <= result["tables"]["digits"]["data"]["classifier"]["held_out_accuracy"] <= 1

    labels = [bench.TASK_LABELS[key] for key in ("toy", "digits")]
    goals = [name for name, metric in result["metrics"].items() if metric["passed"] is not None]
    assert len(goals) == 3 * len(labels)
    for name, metric in result["metrics"].items():
        assert name.split(":")[0] in labels
        for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed"):
            assert key in metric, (name, key)
        assert math.isfinite(metric["candidate"]) and math.isfinite(metric["peer"])
    assert result["passed"] == all(result["metrics"][name]["passed"] for name in goals)
    assert "1.5 × D(1-RF" in result["goal_definition"]
    json.dumps(result)  # the document is JSON-serialisable


def test_quick_run_writes_json_and_plot(quick):
    result, directory = quick
    saved = json.loads((directory / "results" / "quick" / f"{NAME}.json").read_text())
    assert saved["benchmark"] == NAME and set(saved["tables"]) >= {"toy", "digits"}
    picture = directory / "results" / "quick" / f"{NAME}.png"
    assert picture.is_file() and picture.stat().st_size > 1000
    assert result["plot_file"] == str(picture) and result["plots"] == []  # quick plots stay out of RESULTS.md
    assert not (directory / "RESULTS.md").exists()


def test_results_table_renders(tmp_path, quick):
    result, _ = quick
    assert len(result["markdown_tables"]) == 3  # 8 Gaussians SW, digits FD, digits MMD
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | 8 Gaussians: SW, 2-RF 1 step vs 1-RF at 4 steps |" in text
    assert f"## {NAME}" in text and "| 2-RF + distill |" in text and "DDIM check" in text
