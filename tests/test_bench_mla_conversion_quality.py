"""Smoke tests of benchmarks/mla_conversion_quality.py: the data split and the quick mode (a tiny random Llama over
bytes of the Python documentation, every code path: exact check, plain and calibrated ladder, healing, the GQA
control, plot, JSON, RESULTS.md rows) end to end.

Structure and the benchmark's own correctness checks only: nothing asserts on a perplexity level or on a healed model
beating anything.
"""

import json
import math

import pytest
import torch

from hf_ext import benchmarking
from hf_ext.assets import python_doc_files

NAME = "mla_conversion_quality"


@pytest.fixture(scope="module")
def bench():
    return benchmarking.load_benchmark(NAME)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    try:
        python_doc_files(1)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    directory = tmp_path_factory.mktemp("benchmarks")
    threads = torch.get_num_threads()
    try:
        result = bench.run(bench.QUICK, quick=True, benchmarks_dir=directory)
    finally:
        torch.set_num_threads(threads)  # run() picks one thread; leave the other tests as they were
    return result, directory


def test_split_is_by_file_and_sized(bench, tmp_path):
    files = []
    for index in range(12):
        path = tmp_path / f"doc{index:02d}.rst.txt"
        path.write_text(f"Document {index}. " + "x" * (300 + 37 * index))
        files.append(path)
    settings = {**bench.QUICK, "block_size": 64, "eval_blocks": 6, "eval_batch_size": 4, "calibration_blocks": 2,
                "heal_steps": 3, "heal_batch_size": 2, "max_eval_blocks_per_file": 2, "max_train_blocks_per_file": 3}
    data = bench.split_blocks(bench.ByteTokenizer(), settings, files=files)
    assert not set(data["eval_files"]) & set(data["train_files"])
    assert [tuple(b.shape) for b in data["eval_batches"]] == [(4, 64), (2, 64)]
    assert tuple(data["calibration_input_ids"].shape) == (2, 64)
    assert [tuple(b.shape) for b in data["heal_batches"]] == [(2, 64)] * 3
    assert data["report"]["heal_tokens"] == 3 * 2 * 64
    # the same seed gives the same split; calibration and healing blocks are different blocks
    again = bench.split_blocks(bench.ByteTokenizer(), settings, files=files)
    assert again["eval_files"] == data["eval_files"]
    assert again["report"]["train_digest"] == data["report"]["train_digest"]
    with pytest.raises(ValueError, match="not enough text"):
        bench.split_blocks(bench.ByteTokenizer(), {**settings, "heal_steps": 1000}, files=files)


def test_trainable_parameters_selects_attention(bench):
    model = bench.tiny_llama()
    selected = bench.trainable_parameters(model, "attention")
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names and all(".self_attn." in name for name in names)
    assert sum(p.numel() for p in selected) == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert len(bench.trainable_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError):
        bench.trainable_parameters(model, "mlp")


def test_quick_run_structure_and_checks(bench, quick):
    result, _ = quick
    assert result["benchmark"] == NAME and result["quick"] is True
    settings = result["settings"]
    assert settings["model"] == "tiny-llama" and settings["threads"] >= 1

    checks = result["checks"]
    exact = checks["exact_conversion"]
    assert exact["passed"] is True and exact["same_kv_bytes"] is True
    assert exact["max_abs_logit_diff"] <= exact["tolerance"] == bench.FULL["exact_tolerance"]
    assert checks["kv_bytes_formula"] and checks["healing_keeps_cache"] and checks["split_by_file"]
    assert checks["all_finite"]

    tables = result["tables"]
    reference = tables["reference"]
    assert reference["original"]["fraction_of_gqa"] == 1.0 and reference["exact"]["fraction_of_gqa"] == 1.0
    assert reference["exact"]["ppl"] == pytest.approx(reference["original"]["ppl"], rel=1e-5)
    ladder = tables["ladder"]
    assert [(r["qk_rope_head_dim"], r["kv_lora_rank"]) for r in ladder] == [tuple(p) for p in bench.QUICK["ladder"]]
    heal_set = {tuple(p) for p in bench.QUICK["heal"]}
    n_kv, layers = settings["num_key_value_heads"], settings["num_hidden_layers"]
    for row in ladder:
        elements = row["kv_lora_rank"] + n_kv * row["qk_rope_head_dim"]
        assert row["kv_elements_per_token_per_layer"] == elements
        assert row["kv_bytes_per_token_bf16"] * 2 == row["kv_bytes_per_token_fp32"] == 4 * layers * elements
        assert 0 < row["fraction_of_gqa"] < 1
        for variant in ("plain", "calibrated"):
            assert math.isfinite(row[variant]["ppl"]) and row[variant]["ppl"] > 1
            assert row[variant]["tokens"] == settings["eval_blocks"] * (settings["block_size"] - 1)
        assert ("healed" in row) == ((row["qk_rope_head_dim"], row["kv_lora_rank"]) in heal_set)

    healing = tables["healing"]
    assert set(healing) == {f"MLA rope {r} / rank {k}" for r, k in heal_set} | {"GQA original"}
    for run in healing.values():
        assert len(run["train_loss"]) == run["steps"] == settings["heal_steps"] and run["finite"]
        assert run["optimizer_class"] == "hf_ext.optim.lion.Lion" and run["trainable_parameters"] > 0
    assert math.isfinite(tables["fine_tuned_gqa"]["ppl"])
    assert {entry["model"] for entry in tables["published"]} >= {"Llama-2-7B", "Llama-3-8B", "Qwen2.5-7B"}

    metrics = result["metrics"]
    assert "exact conversion vs original" in metrics
    assert sum(name.startswith("training-free calibrated") for name in metrics) == len(ladder)
    assert sum(name.startswith("healed") for name in metrics) == len(heal_set)
    for metric in metrics.values():
        assert metric["unit"] == "PPL" and metric["passed"] is None and metric["goal"] is None
        assert metric["speed_ratio"] == pytest.approx(metric["peer"] / metric["candidate"])
    assert result["passed"] is None
    json.dumps(result)  # the document is JSON-serialisable


def test_quick_run_writes_json_plot_and_renders(quick, tmp_path):
    result, directory = quick
    saved = json.loads((directory / "results" / "quick" / f"{NAME}.json").read_text())
    assert saved["benchmark"] == NAME and len(saved["tables"]["ladder"]) == len(result["tables"]["ladder"])
    picture = directory / "results" / "quick" / f"{NAME}.png"
    assert picture.is_file() and picture.stat().st_size > 1000
    assert result["plots"] == [] and not (directory / "RESULTS.md").exists()  # quick runs stay out of the table

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | exact conversion vs original |" in text and f"## {NAME}" in text
    assert "| original GQA |" in text and "TransMLA" in text
