"""benchmarks/tasks/finetuning_data.py: reStructuredText reduced to glossary definitions and section summaries,
instruction examples that mask the prompt, the tasks split by file; and lora_finetuning's step counting."""

import pytest
import torch

from benchmarks.tasks.assets import python_doc_files
from benchmarks.tasks.finetuning_data import (IGNORE_INDEX, ByteTokenizer, build_tasks, clean_rst, glossary_entries,
                                              instruction_batch, instruction_example, random_batches,
                                              section_summaries)

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


def test_rst_helpers():
    assert clean_rst("See :func:`~os.path.join`, :ref:`magic <x>`, ``a+1``, *b*, `PEP 8 <https://x>`_.") \
        == "See join, magic, a+1, b, PEP 8."
    entries = dict(glossary_entries(GLOSSARY_RST))
    assert set(entries) == {">>>", "abstract base class", "argument", "parameter"}
    assert entries[">>>"].startswith("The default Python prompt") and "  " not in entries[">>>"]
    assert "duck-typing" in entries["abstract base class"] and "second paragraph" not in entries["abstract base class"]
    assert entries["argument"] == entries["parameter"] and "A value passed to a function" in entries["argument"]
    sections = section_summaries(SECTIONS_RST, limit=5)
    assert sections == [("os --- Miscellaneous interfaces",
                         "This module provides a portable way of using os-dependent functionality.")]


def test_instruction_examples_mask_the_prompt():
    tokenizer = ByteTokenizer()
    example = instruction_example(tokenizer, "Q?\nAnswer:", "x" * 100, max_length=20)
    ids, prompt_length = example
    assert len(ids) == 20 and prompt_length == len("Q?\nAnswer:") and ids[-1] == tokenizer.eos_token_id
    assert instruction_example(tokenizer, "a long prompt", "answer", max_length=15) is None
    short = instruction_example(tokenizer, "Q:", "yes it is", max_length=64)
    batch = instruction_batch([example, short], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 20)
    assert (batch["labels"][0, :prompt_length] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0, prompt_length:], batch["input_ids"][0, prompt_length:])
    length = len(short[0])
    assert batch["attention_mask"][1].sum() == length and (batch["labels"][1, length:] == IGNORE_INDEX).all()


def test_tasks_have_one_batch_per_step_and_answer_only_labels():
    try:
        python_doc_files(1)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    settings = {"tasks": ["text", "instruction"], "seed": 0, "steps": 3, "batch_size": 2, "block_size": 256,
                "eval_examples": 4, "eval_batch_size": 4, "max_blocks_per_file": 2, "max_sections_per_file": 2}
    tasks = build_tasks(ByteTokenizer(), settings)
    text, instruction = tasks["text"], tasks["instruction"]
    assert len(text.train_batches) == len(instruction.train_batches) == 3
    assert all(batch["input_ids"].shape == (2, 256) for batch in text.train_batches)
    assert all(torch.equal(batch["labels"], batch["input_ids"]) for batch in text.train_batches + text.eval_batches)
    for batch in instruction.train_batches + instruction.eval_batches:
        answered = batch["labels"] != IGNORE_INDEX
        assert answered.any(dim=1).all() and not answered[:, 0].any()  # every example has an answer, never a prompt
        assert torch.equal(batch["labels"][answered], batch["input_ids"][answered])
        assert not (answered & (batch["attention_mask"] == 0)).any()  # padding is never a target
    assert sum(len(batch["input_ids"]) for batch in instruction.eval_batches) == 4
    assert text.report["eval_files"] and text.report["train_files"] > 0


def test_random_batches_are_seeded():
    first, again, other = (random_batches(50, 3, 2, 8, seed=seed) for seed in (1, 1, 2))
    assert len(first) == 3 and first[0]["input_ids"].shape == (2, 8)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])
    assert torch.equal(first[0]["labels"], first[0]["input_ids"])


def test_steps_to_threshold():
    from benchmarks.lora_finetuning import step_ratio, steps_to_threshold

    curve = {0: 3.0, 2: 2.5, 4: 2.0}
    assert steps_to_threshold(curve, 2.0) == 4 and steps_to_threshold(curve, 2.6) == 2
    assert steps_to_threshold(curve, 1.0) is None
    assert step_ratio(4, 2)["step_ratio"] == 2.0 and step_ratio(4, None)["step_ratio"] is None
    assert step_ratio(None, 2)["step_ratio"] is None and step_ratio(4, 0)["step_ratio"] is None
