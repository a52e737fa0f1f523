"""Smoke tests of benchmarks/training_quality.py: the label-noising function and a tiny end-to-end run."""

import json

import pytest
import torch

from hf_ext import benchmarking
from hf_ext.assets import python_doc_files



@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark("training_quality")


def test_noisy_labels_replaces_the_fraction_and_never_ignored_positions(bench):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(3, 1000, (64, 128), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.3
    labels[ignored] = -100
    original = labels.clone()
    noisy, replaced = bench.noisy_labels(labels, 0.15, 1000, torch.Generator().manual_seed(1))

    assert torch.equal(labels, original)  # the input is not modified
    assert torch.equal(noisy[ignored], labels[ignored]) and (noisy[ignored] == -100).all()
    assert not replaced[ignored].any()
    valid = ~ignored
    changed = (noisy != labels) & valid
    assert abs(replaced[valid].float().mean().item() - 0.15) < 0.01
    assert abs(changed[valid].float().mean().item() - 0.15) < 0.01
    assert torch.equal(changed, changed & replaced)  # only replaced positions change
    assert ((noisy[valid] >= 3) & (noisy[valid] < 1000))[replaced[valid]].all()
    # the same generator seed gives the same noise; fraction 0 changes nothing
    again, _ = bench.noisy_labels(labels, 0.15, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    untouched, none = bench.noisy_labels(labels, 0.0, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(untouched, labels) and not none.any()
    with pytest.raises(ValueError):
        bench.noisy_labels(labels, 1.5, 1000, generator)


def test_run_specs_pair_every_candidate_with_its_reference(bench):
    specs = bench.run_specs(bench.FULL)
    names = [spec.name for spec in specs]
    assert names[0] == "AdamW, CE, clean" and len(set(names)) == len(names)
    for factor in ("1", "3", "10"):
        assert f"Lion ×{factor}, CE, clean" in names
    assert "AdamW, CE, 15% noisy labels" in names
    for gamma, min_weight in bench.FULL["tailr"]:
        loss = bench.tailr_name(gamma, min_weight)
        assert f"AdamW, {loss}, 15% noisy labels" in names
        assert (f"AdamW, {loss}, clean" in names) == ((gamma, min_weight) not in bench.FULL["clean_skip"])
    noisy = [spec for spec in specs if spec.label_noise]
    assert all(spec.label_noise == 0.15 and spec.optimizer == "adamw" for spec in noisy)
    assert {spec.min_weight for spec in specs if spec.gamma is not None} == {0.0, 0.2}


def test_quick_run_end_to_end(bench, tmp_path):
    try:
        python_doc_files(1)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    settings = {**bench.QUICK, "steps": 2, "eval_every": 1, "max_characters": 60_000, "eval_blocks": 8}
    threads = torch.get_num_threads()
    try:
        result = bench.run(settings, save=False, quick=True)
    finally:
        torch.set_num_threads(threads)  # run() picks one thread for the benchmark; leave other tests as they were

    assert result["benchmark"] == "training_quality" and result["quick"] is True
    assert result["checks"]["same_data_order"] is True
    assert result["checks"]["label_noise"]["inputs_unchanged"] is True
    assert abs(result["checks"]["label_noise"]["replaced_target_fraction"] - 0.15) < 0.03
    classes = result["checks"]["optimizer_classes"]
    assert classes["Lion ×3, CE, clean"] == "hf_ext.optim.lion.Lion"
    assert classes["AdamW, CE, clean"] == "torch.optim.adamw.AdamW"
    assert result["checks"]["final_eval_recomputed_max_abs_diff"] < 1e-4

    runs = {run["name"]: run for run in result["tables"]["runs"]}
    assert list(runs) == [spec.name for spec in bench.run_specs(settings)]
    for run in runs.values():
        assert set(run["eval_curve"]) == {"0", "1", "2"}
        assert run["final_eval_loss"] == run["eval_curve"]["2"] and 0 < run["final_eval_loss"] < 20
        assert run["batches"] >= settings["steps"]
        assert 0 <= run["final_eval_accuracy"] <= 100 and run["final_eval_median_token_loss"] > 0
    # every seed-0 run starts from the same weights: the same step-0 loss
    assert len({run["eval_curve"]["0"] for run in runs.values()}) == 1
    assert runs["AdamW, TaiLr γ=0.1, clean"]["loss"] == "TaiLr γ=0.1"

    assert set(result["metrics"]) == {
        "eval loss: Lion (adamw_to_lion ×3) vs AdamW",
        "clean eval loss, 15% noisy labels: TaiLr γ=0.1 vs CE",
        "clean eval loss, clean labels: TaiLr γ=0.1 vs CE",
    }
    for metric in result["metrics"].values():
        assert metric["unit"] == "nats" and metric["passed"] is None
        assert metric["speed_ratio"] == pytest.approx(metric["peer"] / metric["candidate"])
    cost = result["tables"]["label_noise_cost"]
    assert cost["nats"] == pytest.approx(runs["AdamW, CE, 15% noisy labels"]["final_eval_loss"]
                                         - runs["AdamW, CE, clean"]["final_eval_loss"])
    json.dumps(result)  # the document is JSON-serialisable

    # and renders in RESULTS.md next to other benchmarks
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "training_quality.json").write_text(json.dumps(result))
    table = benchmarking.write_results_table(tmp_path).read_text()
    assert "Lion (adamw_to_lion ×3) vs AdamW" in table and "## training_quality" in table
