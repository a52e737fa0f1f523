"""Smoke tests of benchmarks/lora_finetuning.py: its text helpers and the quick mode (a tiny Llama over bytes of the
Python documentation, every method and task for a few steps) end to end.

Structure only: the keys exist, the losses are finite, one curve per method and task, the plot and JSON are
written, the rows render in RESULTS.md. Nothing asserts on a loss level, a time, a peak or the goal being met.
"""

import json
import math

import pytest
import torch

from hf_ext import benchmarking
from hf_ext.assets import python_doc_files

NAME = "lora_finetuning"

GLOSSARY_RST = """\
.. _glossary:

Glossary
========

.. glossary::

   ``>>>``
      The default Python prompt of the interactive shell.  Often seen for code
      examples.

   abstract base class
      Abstract base classes complement :term:`duck-typing` by providing a way
      to define interfaces (see :ref:`magic methods <special-lookup>`).

      A second paragraph.

   argument
   parameter
      Can refer to:

      * A value passed to a :term:`function` when calling it.

After the glossary.
"""

SECTIONS_RST = """\
:mod:`os` --- Miscellaneous interfaces
======================================

.. module:: os

This module provides a portable way of using ``os``-dependent functionality. More text.

Files
-----

The following functions are provided:

Notes
-----

::

   code

Short.
"""


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
        torch.set_num_threads(threads)
    return result, directory


def test_rst_helpers(bench):
    assert bench.clean_rst("See :func:`~os.path.join`, :ref:`magic <x>`, ``a+1``, *b*, `PEP 8 <https://x>`_.") \
        == "See join, magic, a+1, b, PEP 8."
    entries = dict(bench.glossary_entries(GLOSSARY_RST))
    assert set(entries) == {">>>", "abstract base class", "argument", "parameter"}
    assert entries[">>>"].startswith("The default Python prompt") and "  " not in entries[">>>"]
    assert "duck-typing" in entries["abstract base class"] and "second paragraph" not in entries["abstract base class"]
    assert entries["argument"] == entries["parameter"] and "A value passed to a function" in entries["argument"]
    sections = bench.section_summaries(SECTIONS_RST, limit=5)
    assert sections == [("os --- Miscellaneous interfaces",
                         "This module provides a portable way of using os-dependent functionality.")]


def test_instruction_examples_mask_the_prompt(bench):
    tokenizer = bench.ByteTokenizer()
    example = bench.instruction_example(tokenizer, "Q?\nAnswer:", "x" * 100, max_length=20)
    ids, prompt_length = example
    assert len(ids) == 20 and prompt_length == len("Q?\nAnswer:") and ids[-1] == tokenizer.eos_token_id
    assert bench.instruction_example(tokenizer, "a long prompt", "answer", max_length=15) is None
    short = bench.instruction_example(tokenizer, "Q:", "yes it is", max_length=64)
    batch = bench.instruction_batch([example, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 20)
    assert (batch["labels"][0, :prompt_length] == bench.IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0, prompt_length:], batch["input_ids"][0, prompt_length:])
    length = len(short[0])
    assert batch["attention_mask"][1].sum() == length and (batch["labels"][1, length:] == bench.IGNORE_INDEX).all()


def test_steps_to_threshold(bench):
    curve = {0: 3.0, 2: 2.5, 4: 2.0}
    assert bench.steps_to_threshold(curve, 2.0) == 4 and bench.steps_to_threshold(curve, 2.6) == 2
    assert bench.steps_to_threshold(curve, 1.0) is None
    assert bench.step_ratio(4, 2)["step_ratio"] == 2.0 and bench.step_ratio(4, None)["step_ratio"] is None


def test_quick_run_structure(bench, quick):
    result, _ = quick
    assert result["benchmark"] == NAME and result["quick"] is True
    settings = result["settings"]
    assert settings["model"] == "tiny-llama" and settings["learning_rate"] == bench.FULL["learning_rate"]
    assert settings["hf_ext_lora_ga_gradient_passes"] == 2 + 2 * settings["power_iterations"]
    eval_steps = {str(step) for step in bench.eval_steps(settings)}
    assert eval_steps == {"0", "2", "4"}

    tasks = result["tables"]["tasks"]
    assert list(tasks) == list(bench.TASKS)
    for name, task in tasks.items():
        runs = task["runs"]
        assert list(runs) == list(bench.METHODS)  # one curve per method
        assert task["threshold"] == runs["lora"]["final_eval_loss"]
        assert "step_ratio" in task and "step_ratio_note" in task
        for method, run in runs.items():
            for key in ("label", "optimizer_class", "trained_parameters", "init_seconds", "init_peak_bytes",
                        "init_peak_mib", "train_peak_bytes", "train_peak_mib", "train_seconds", "seconds_per_step",
                        "train_loss", "eval_curve", "initial_eval_loss", "final_eval_loss", "steps_to_threshold",
                        "init_logits_max_abs_diff"):
                assert key in run, (name, method, key)
            assert len(run["train_loss"]) == settings["steps"]
            assert set(run["eval_curve"]) == eval_steps
            assert all(math.isfinite(loss) and loss > 0 for loss in [*run["train_loss"], *run["eval_curve"].values()])
            assert run["final_eval_loss"] == run["eval_curve"][str(settings["steps"])] and run["finite"] is True
            assert run["steps_to_threshold"] is None or str(run["steps_to_threshold"]) in eval_steps
            assert run["init_peak_bytes"] >= 0 and run["trained_parameters"] > 0
            assert math.isfinite(run["init_logits_max_abs_diff"])
        assert runs["gv_resample"]["optimizer_class"].endswith("GradientViewLoRA")
        assert runs["lora"]["optimizer_class"] == "torch.optim.adamw.AdamW"
        assert result["checks"][name]["curves"] == len(bench.METHODS) and result["checks"][name]["all_finite"]
        assert set(result["checks"][name]["init_logits_max_abs_diff"]) == set(bench.METHODS)
        assert len({run["eval_curve"]["0"] for run in runs.values()}) == 1  # the loaded model's, shared

    for task in bench.TASKS:
        for metric in (f"{task}: steps to LoRA's final eval loss, hf_ext LoRA-GA vs LoRA",
                       f"{task}: final eval loss, hf_ext LoRA-GA vs LoRA",
                       f"{task}: LoRA-GA init peak memory, hf_ext vs PEFT"):
            assert metric in result["metrics"]
            for key in ("description", "unit", "candidate", "peer", "speed_ratio", "goal", "passed"):
                assert key in result["metrics"][metric]
    json.dumps(result)  # the document is JSON-serialisable


def test_quick_run_writes_json_and_plot(quick):
    result, directory = quick
    saved = json.loads((directory / "results" / "quick" / f"{NAME}.json").read_text())
    assert saved["benchmark"] == NAME and set(saved["tables"]["tasks"]) == set(result["tables"]["tasks"])
    picture = directory / "results" / "quick" / f"{NAME}.png"
    assert picture.is_file() and picture.stat().st_size > 1000
    assert result["plot_file"] == str(picture) and result["plots"] == []  # quick plots stay out of RESULTS.md
    assert not (directory / "RESULTS.md").exists()


def test_results_table_renders(tmp_path, quick):
    result, _ = quick
    assert len(result["markdown_tables"]) == 2
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / f"{NAME}.json").write_text(json.dumps(dict(result, quick=False)))
    text = benchmarking.write_results_table(tmp_path).read_text()
    assert f"| {NAME} | text: steps to LoRA's final eval loss, hf_ext LoRA-GA vs LoRA |" in text
    assert f"## {NAME}" in text and "| LoRA-GA (hf_ext get_lora_ga_model) |" in text
    assert "step ratio >= 2.0" in text
