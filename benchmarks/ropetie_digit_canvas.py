"""RoPE-Tie on real images: a tiny vision-language model answering questions about digits on a canvas.

The question (from the issue): train one small HfExt image-text model per `position_layout` (``flatten``, ``mrope``,
``rope_tie_v1``, ``rope_tie_v2``) at one canvas size, then evaluate it at that size and on larger canvases than it was
trained on (resolution extrapolation). The RoPE-Tie blog (kexue.fm 10040, 10352) expects RoPE-Tie-v2's symmetry and
equivalence properties to help most off the trained size. Accuracy per layout is reported as measured.

Task. A canvas of G×G cells, 8·G × 8·G grey pixels; each cell is empty (zeros) or holds one of scikit-learn's 8×8
handwritten digits (`sklearn.datasets.load_digits`, pixel values /16). With `patch_size=8` every cell is exactly
one image token. The 1797 digit images are split by a fixed permutation (``split_seed``) into 1258 training and 539
evaluation images, so evaluation canvases only show digit images never seen in training. Every canvas comes with
four questions, each answered by one word (a digit or "none"):

* ``at``: "what is at row r col c ?" → the digit in that cell or "none". Rows and columns are asked only up to the
  trained size, also on larger canvases, so the numbers in the question are ones used as coordinates in training;
  on larger canvases a separate set asks about a cell beyond (``at_beyond``, reported apart, not in the overall).
* ``count``: "how many d ?" → "0".."9". The count k is drawn uniformly from 0..9 first and planted, so the answer
  distribution is the same at every size.
* ``left_of`` / ``above``: "what is left of d ?" / "what is above d ?" with d on the canvas exactly once → the digit
  in the cell immediately left of / above d, or "none" (that cell is empty, or d is on the first column / row).
  The answer is drawn first, uniformly from "none" and the 8 digits that are neither of the two asked-about digits,
  so "none" does not dominate; half of the "none" answers put d on the edge. This pair is where the layouts differ
  in principle: the cell above is w token positions back in ``flatten`` (the cell to the left always 1), w + 1
  back on the row axis in ``rope_tie_v1`` (the cell to the left h + 1 on the column axis), so these depend on the
  canvas size, while ``mrope`` and ``rope_tie_v2`` keep unit spacing on the row and column axes at every size.

The other cells are empty with probability ``empty_probability`` (0.25), else a random digit other than the three
asked about. Majority-answer and chance baselines per question type and size are in ``tables.baselines``.

What every layout must still extrapolate: the questions follow the image, so the distance from a question token to a
given cell grows with the canvas in every layout. On the row axis, from the first token after a G×G image to row r
(column 1; tested in tests/test_bench_ropetie_digit_canvas.py): ``flatten`` G² − (r − 1)·G (its one axis),
``rope_tie_v1`` (G + 1)(G + 1 − r), ``rope_tie_v2`` (G² + G)/2 + 1 − r, ``mrope`` G + 1 − r; from 4×4 to 6×6 that
is +11 for v2 and +2 for mrope at every row. "count" additionally sees more cells. Only the neighbour questions
have a geometry that some layouts keep fixed.

Format. One training sequence is ``<image> what is at row r col c ? A1 how many d ? A2 what is left of d' ? A3 what
is above d'' ? A4 <eos>``, with the loss on the four answers and <eos> only: four supervised answers share the 18
image tokens of a canvas. The fixed order puts every question at a fixed offset from the image. Evaluation uses the
same format: each question is answered by greedy ``model.generate(max_new_tokens=1)`` given the canvas and the
earlier questions with their true answers; the argmax of one forward pass over the whole text must pick the same
tokens at every answer position (``checks.generate_matches_argmax``, a check of the positions generate() computes).

Model and training. HfExt with a linear patch embedding (64 pixels → hidden), hidden size 64, 4 layers, 4 heads
(head_dim 16, so 8 rotary frequencies), SwiGLU 172, ``rope_theta`` 100, ``initializer_range`` 0.08, ~0.21 M
parameters, fp32, sdpa, CPU. AdamW, lr 3e-3, betas (0.9, 0.99), weight decay 0.01, 100 warm-up steps, constant,
cosine to 0 over the last 25 %, gradient clipping 1.0; 8000 steps of 64 canvases (4×4, 46 tokens each). Every
layout starts from the same initial weights (``checks.same_initial_weights``) and sees the same batches in the same
order (``checks.same_data_order`` compares a digest of every batch). Same hyper-parameters for every layout; nothing
was tuned per layout. One seed; there was no budget for a seed spread, so differences of a few points are not
evidence.

Choices:

* Trained size 4×4: the smallest canvas with room for a count of 9 plus the two planted neighbour pairs (13 cells);
  6×6 and 8×8 have 2.25× and 4× the area.
* ``rope_theta`` 100 instead of 10000: with only 8 frequencies per head, 10000 leaves one or two that turn
  noticeably between neighbouring cells. In a short run (1200 steps, flatten and rope_tie_v2, 200 canvases) "at" at
  4×4 reached 41.0 / 78.0 % with 10000 and 98.5 / 98.0 % with 100; reproduce with
  ``main(layouts=["flatten", "rope_tie_v2"], steps=1200, eval_sizes=[4, 6], eval_canvases=200,
  model={**FULL["model"], "rope_theta": 10000.0})`` and the same call without the ``model`` override.
* ``initializer_range`` 0.08 instead of the default 0.02 is kept from exploratory runs of an earlier format (one
  question per canvas), where 0.02 stayed longer on the loss plateau of the answer prior. In this format it matters
  little: in the same short run (1200 steps, flatten / rope_tie_v2 at 4×4) at, count, left_of, above reach
  98.5 / 98.0, 75.5 / 71.0, 24.0 / 23.0, 20.5 / 20.0 % with 0.08 and 97.0 / 98.5, 67.5 / 65.0, 24.5 / 23.0,
  25.0 / 26.0 % with 0.02 (same call with ``model={**FULL["model"], "initializer_range": 0.02}``).
* ``mrope`` follows Qwen2-VL's contiguous frequency sections: with head_dim 16, ``mrope_section`` is [2, 3, 3], so
  the time axis (constant inside an image) gets the two highest frequencies, rows the next three and columns the
  three lowest (wavelengths of ~110 to ~360 positions at rope_theta 100); RoPE-Tie interleaves the frequencies
  (axis f mod 2), so both axes get high and low ones. Qwen2-VL's own proportions at head_dim 128 ([16, 24, 24])
  likewise give the columns the lowest frequencies. At the trained size mrope still learns every question type.

Parallelism: the layouts are trained in ``workers`` (2) processes at once, one torch thread each
(``HF_EXT_BENCH_THREADS`` changes that); each process builds the same batches from the same seeds. A training
step of this model gains nothing from a second thread, while two processes use both cores.

Results: ``benchmarks/results/ropetie_digit_canvas.json`` (accuracy per layout × size × question type under
``tables.accuracy``, baselines, per-layout training time and loss curve (means over 25 steps), every generated
answer, and the rotary positions of a small example in each layout under ``tables.positions_example``), a section
in RESULTS.md (the table and a generated reading of it), informational ``metrics`` rows (overall accuracy of
RoPE-Tie-v2 vs flatten per size, ratio = candidate / peer accuracy, no pass/fail goal) and the plot
``benchmarks/results/ropetie_digit_canvas.png``.

Run with ``hf-ext bench ropetie_digit_canvas`` (about 50 minutes on 2 CPU cores) or
``hf-ext bench ropetie_digit_canvas --quick`` (a tiny model for 3 steps: a smoke test of every code path, not a
measurement; written to ``benchmarks/results/quick/``).
Keyword arguments of `main` override entries of `FULL`, e.g. ``main(steps=10000)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_ext import HfExtConfig, HfExtForCausalLM
from hf_ext.benchmarking import (
    THREADS_ENVIRONMENT_VARIABLE,
    benchmark_settings,
    configure_threads,
    make_result,
    pyplot,
    save_figure,
    save_result,
)
from hf_ext.digit_canvas import build_processor

NAME = "ropetie_digit_canvas"
BENCH_DIR = Path(__file__).resolve().parent
LAYOUTS = ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2")
CANDIDATE = "hf_ext RoPE-Tie-v2 (position_layout='rope_tie_v2')"
PEER = "flatten (RoPE-1D over token order), same initial weights, data order and budget"
CELL = 8  # pixels per cell side = the patch size: one digit image is exactly one patch token
IGNORE_INDEX = -100
LOSS_WINDOW = 25  # the result file keeps the training loss as means over windows of this many steps
MAX_COUNT = 9  # count answers are single digit tokens
KINDS = ("at", "count", "left_of", "above")  # the questions of every canvas, in this order
BEYOND = "at_beyond"  # an "at" question about a row or column beyond the trained size (reported apart)
# How many different answers each question type has (chance = 1 / that): "at" a digit or "none"; "count" 0..9;
# left_of / above "none" or one of the 8 digits that are neither of the two asked-about (unique) digits.
ANSWER_OPTIONS = {"at": 11, BEYOND: 11, "count": MAX_COUNT + 1, "left_of": 9, "above": 9}

FULL = {
    "layouts": list(LAYOUTS),
    "train_size": 4,
    "eval_sizes": [4, 6, 8],
    "empty_probability": 0.25,
    "eval_fraction": 0.3,
    "split_seed": 0,
    "data_seed": 0,
    "eval_seed": 1,
    "seed": 0,
    "model": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
              "initializer_range": 0.08, "rope_theta": 100.0},
    "steps": 8000,
    "batch_size": 64,
    "learning_rate": 3e-3,
    "adam_betas": [0.9, 0.99],
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "decay_fraction": 0.25,
    "grad_clip": 1.0,
    "log_every": 250,
    "eval_canvases": 500,
    "eval_batch_size": 100,
    "workers": 2,
}
QUICK = {
    **FULL,
    "eval_sizes": [4, 5],
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "initializer_range": 0.08},
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_canvases": 8,
    "eval_batch_size": 4,
}


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Digit images


@dataclass(frozen=True)
class DigitPool:
    """Digit images of one split: ``images`` [n, 8, 8] in [0, 1], ``labels`` [n], ``indices`` into load_digits()."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    by_digit: tuple[tuple[int, ...], ...] = field(init=False)  # positions in this pool of each digit's images

    def __post_init__(self):
        object.__setattr__(self, "by_digit", tuple(tuple((self.labels == d).nonzero().flatten().tolist())
                                                         for d in range(10)))


def split_digits(eval_fraction: float, seed: int) -> dict[str, DigitPool]:
    """scikit-learn's 1797 8×8 digits, split by image with a fixed permutation: ``train`` and ``eval`` share no image,
    so evaluation canvases are drawn with digit images the model has never seen."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_eval = round(eval_fraction * len(labels))
    parts = {"eval": order[:n_eval].sort().values, "train": order[n_eval:].sort().values}
    return {name: DigitPool(images[index], labels[index], index) for name, index in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Canvases and their questions
#
# A canvas is a size × size grid of cells (row 1 at the top, column 1 on the left); a cell holds a digit or is empty
# (None). Every canvas comes with one question of each type in KINDS, each answered by one word (a digit or "none").

Cells = tuple[tuple[int | None, ...], ...]
_FREE = "free"  # a cell not yet decided while a canvas is built


@dataclass(frozen=True)
class Question:
    kind: str
    text: str  # e.g. "what is at row 2 col 3 ?"
    answer: str  # "0".."9" or "none"


@dataclass(frozen=True)
class Canvas:
    cells: Cells
    questions: tuple[Question, ...]

    def text(self) -> str:
        """The whole training text: the image, then every question followed by its answer."""
        return " ".join(["<image>"] + [f"{q.text} {q.answer}" for q in self.questions])


def _word(value: int | None) -> str:
    return "none" if value is None else str(value)


def _neighbour(kind: str, row: int, col: int) -> tuple[int, int]:
    """The cell a left_of / above question reads (0-based): one column to the left / one row up."""
    return (row, col - 1) if kind == "left_of" else (row - 1, col)


def _place_neighbour_question(rng: random.Random, grid: list, kind: str, digit: int, answer: int | None) -> bool:
    """Put ``digit`` in a free cell whose left / upper neighbour gives ``answer``; False when no such cell is left.

    A "none" answer puts the digit on the first column / row half of the time, and next to an empty cell otherwise.
    """
    size = len(grid)
    on_edge = answer is None and rng.random() < 0.5
    candidates = []
    for row in range(size):
        for col in range(size):
            along = col if kind == "left_of" else row  # 0-based index in the direction of the question
            if (along == 0) != on_edge or grid[row][col] != _FREE:
                continue
            if not on_edge and grid[_neighbour(kind, row, col)[0]][_neighbour(kind, row, col)[1]] != _FREE:
                continue
            candidates.append((row, col))
    if not candidates:
        return False
    row, col = rng.choice(candidates)
    grid[row][col] = digit
    if not on_edge:
        n_row, n_col = _neighbour(kind, row, col)
        grid[n_row][n_col] = answer
    return True


def _try_canvas(rng: random.Random, size: int, empty_probability: float, ask_limit: int,
                beyond: bool) -> Canvas | None:
    # The answers are drawn first, so that their distributions are the same at every canvas size and no answer
    # (e.g. "none") dominates: count k uniform in 0..9; left_of / above uniform over "none" and the 8 digits that are
    # not asked about. Then the cells are planted to match, and the rest filled at random.
    count_digit = rng.randrange(10)
    count = rng.randint(0, MAX_COUNT)
    left_digit, above_digit = rng.sample([d for d in range(10) if d != count_digit], 2)
    unique = (left_digit, above_digit)  # each on the canvas exactly once
    grid = [[_FREE] * size for _ in range(size)]
    answers = {}
    for kind, digit in (("left_of", left_digit), ("above", above_digit)):
        answers[kind] = rng.choice([None] + [d for d in range(10) if d not in unique])
        if not _place_neighbour_question(rng, grid, kind, digit, answers[kind]):
            return None
    planted = sum(value == count_digit for row in grid for value in row)  # a neighbour answer can be count_digit
    free = [(r, c) for r in range(size) for c in range(size) if grid[r][c] == _FREE]
    if planted > count or count - planted > len(free):
        return None
    for r, c in rng.sample(free, count - planted):
        grid[r][c] = count_digit
    others = [d for d in range(10) if d not in (count_digit, *unique)]
    for row in grid:
        for c, value in enumerate(row):
            if value == _FREE:
                row[c] = None if rng.random() < empty_probability else rng.choice(others)
    if beyond:
        cells = [(r, c) for r in range(1, size + 1) for c in range(1, size + 1) if max(r, c) > ask_limit]
        at_row, at_col = rng.choice(cells)
    else:
        # Only rows and columns the model was trained on, so that the numbers in the question are in distribution.
        limit = min(size, ask_limit)
        at_row, at_col = rng.randint(1, limit), rng.randint(1, limit)
    questions = (
        Question(BEYOND if beyond else "at", f"what is at row {at_row} col {at_col} ?",
                 _word(grid[at_row - 1][at_col - 1])),
        Question("count", f"how many {count_digit} ?", str(count)),
        Question("left_of", f"what is left of {left_digit} ?", _word(answers["left_of"])),
        Question("above", f"what is above {above_digit} ?", _word(answers["above"])),
    )
    return Canvas(tuple(tuple(row) for row in grid), questions)


def make_canvas(rng: random.Random, size: int, empty_probability: float, ask_limit: int,
                beyond: bool = False) -> Canvas:
    """A random size × size canvas with its four questions (see `_try_canvas`; drawn again until the planted cells
    fit, which at size ≥ 4 almost always succeeds at once).

    ``ask_limit``: "at" asks about rows and columns ≤ ask_limit (the trained size); ``beyond=True`` instead asks
    about a cell with row or column > ask_limit.
    """
    if size < 2:
        raise ValueError(f"a canvas needs at least 2×2 cells (the neighbour questions), got {size}")
    if beyond and size <= ask_limit:
        raise ValueError(f"no cell beyond row/column {ask_limit} on a {size}×{size} canvas")
    for _ in range(1000):
        canvas = _try_canvas(rng, size, empty_probability, ask_limit, beyond)
        if canvas is not None:
            return canvas
    raise RuntimeError(f"could not plant the questions on a {size}×{size} canvas")


def render(cells: Cells, pool: DigitPool, rng: random.Random) -> tuple[torch.Tensor, list]:
    """The canvas image [8·size, 8·size] (zeros for empty cells), a random image of each cell's digit from ``pool``,
    and which pool image fills each cell (None: empty)."""
    size = len(cells)
    image_ids = [[None if v is None else rng.choice(pool.by_digit[v]) for v in row] for row in cells]
    blank = torch.zeros(CELL, CELL)
    tiles = torch.stack([pool.images[i] if i is not None else blank for row in image_ids for i in row])
    canvas = tiles.reshape(size, size, CELL, CELL).permute(0, 2, 1, 3).reshape(size * CELL, size * CELL)
    return canvas, image_ids


def make_examples(count: int, size: int, pool: DigitPool, seed: int, empty_probability: float, ask_limit: int,
                  beyond: bool = False) -> list[tuple[Canvas, torch.Tensor]]:
    """``count`` canvases with their rendered images, reproducible from ``seed``."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        canvas = make_canvas(rng, size, empty_probability, ask_limit, beyond)
        examples.append((canvas, render(canvas.cells, pool, rng)[0]))
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Batches


def encode(processor, examples: list[tuple[Canvas, torch.Tensor]]) -> dict:
    """Model inputs of whole canvas texts with <eos> appended, ``labels`` on every answer and on <eos>, and the
    ``answer_positions`` [batch, 4] (the index of each answer token; the logits one position earlier predict it).

    All canvases of a batch have the same size and every question type a fixed number of words, so the rows have
    equal length and the answers sit at the same positions in every row.
    """
    tokenizer = processor.tokenizer
    texts = [canvas.text() for canvas, _ in examples]
    batch = dict(processor(text=texts, images=[[image] for _, image in examples]))
    if not bool(batch["attention_mask"].all()):
        raise ValueError("the canvases of a batch must have one size (rows of equal length)")
    eos = torch.full((len(texts), 1), tokenizer.eos_token_id)
    batch["input_ids"] = torch.cat([batch["input_ids"], eos], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(eos)], dim=1)
    # Word i of the text after <image> sits `words - i` positions before the <eos> column (one token per word).
    words = texts[0].split()[1:]
    word_index, index = [], 0
    for question in examples[0][0].questions:
        index += len(question.text.split())
        word_index.append(index)
        index += 1
    length = batch["input_ids"].shape[1]
    positions = torch.tensor([length - 1 - (len(words) - i) for i in word_index])
    answer_ids = torch.tensor([tokenizer.convert_tokens_to_ids([q.answer for q in canvas.questions])
                               for canvas, _ in examples])
    if not torch.equal(batch["input_ids"][:, positions], answer_ids):
        raise AssertionError("answer positions do not hold the answer tokens")
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, positions] = answer_ids
    labels[:, -1] = tokenizer.eos_token_id
    batch.update(labels=labels, answer_positions=positions, answer_ids=answer_ids)
    return batch


def _compact(batch: dict) -> dict:
    # Canvas pixels are k/16 (scikit-learn's 0..16 levels): stored as uint8 k the training batches take a quarter of
    # the memory, so they can be built once and replayed for every layout.
    pixels = batch["pixel_values"] * 16
    if not torch.equal(pixels, pixels.round()):
        raise ValueError("canvas pixels are not multiples of 1/16")
    return {**batch, "pixel_values": pixels.round().to(torch.uint8)}


def model_inputs(batch: dict, length: int | None = None) -> dict:
    """What the model takes (pixels back to floats), optionally only the first ``length`` tokens (a prefix)."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "image_grid_hw", "labels") if key in batch}
    inputs["pixel_values"] = batch["pixel_values"].float() / 16
    if length is not None:
        inputs = {**inputs, "input_ids": inputs["input_ids"][:, :length],
                  "attention_mask": inputs["attention_mask"][:, :length]}
        inputs.pop("labels", None)
    return inputs


def training_batches(settings: dict, processor, pool: DigitPool) -> tuple[list[dict], str]:
    """Every training batch (canvases of the trained size, training digit images) and a digest of their contents."""
    batches, digest = [], hashlib.sha256()
    for step in range(settings["steps"]):
        examples = make_examples(settings["batch_size"], settings["train_size"], pool,
                                 seed=settings["data_seed"] * 1_000_003 + step,
                                 empty_probability=settings["empty_probability"], ask_limit=settings["train_size"])
        batch = _compact(encode(processor, examples))
        for key in ("input_ids", "pixel_values"):
            digest.update(batch[key].numpy().tobytes())
        batches.append(batch)
    return batches, digest.hexdigest()[:16]


def evaluation_sets(settings: dict, processor, pool: DigitPool) -> dict:
    """Per canvas size: held-out canvases (evaluation digit images) in batches, shared by every layout; for sizes
    beyond the trained one also a set whose "at" question asks about a cell outside the trained rows/columns."""
    sets = {}
    n, batch_size, train_size = settings["eval_canvases"], settings["eval_batch_size"], settings["train_size"]
    for size in settings["eval_sizes"]:
        for beyond in ([False, True] if size > train_size else [False]):
            examples = make_examples(n, size, pool, seed=settings["eval_seed"] * 1_000_003 + 10 * size + beyond,
                                     empty_probability=settings["empty_probability"], ask_limit=train_size,
                                     beyond=beyond)
            batches = [_compact(encode(processor, examples[i:i + batch_size])) for i in range(0, n, batch_size)]
            sets[(size, beyond)] = {"batches": batches,
                                    "answers": [[q.answer for q in canvas.questions] for canvas, _ in examples]}
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Model, training, evaluation


def build_model(layout: str, settings: dict, processor, seed: int) -> HfExtForCausalLM:
    tokenizer = processor.tokenizer
    config = HfExtConfig(**settings["model"], position_layout=layout, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **processor.model_config_kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # the same seed gives every layout the same initial weights (the layouts add none)
    return HfExtForCausalLM(config)


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def learning_rate_factor(step: int, warmup: int, total: int, decay_fraction: float = 1.0) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then a cosine decay to 0 over the last ``decay_fraction`` of
    the steps after the warm-up (1.0: cosine right after the warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_start = max(warmup, total - decay_fraction * (total - warmup))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1.0, total - decay_start)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: HfExtForCausalLM, batches: list[dict], settings: dict, label: str) -> dict:
    """AdamW over ``batches`` in order; returns the per-step losses and timings."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], betas=tuple(settings["adam_betas"]),
                                  weight_decay=settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(
        step, settings["warmup_steps"], len(batches), settings["decay_fraction"]))
    model.train()
    losses, started = [], time.perf_counter()
    for step, batch in enumerate(batches):
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % settings["log_every"] == 0 or step + 1 == len(batches):
            recent = losses[-settings["log_every"]:]
            _log(f"  {label} step {step + 1}/{len(batches)}: loss {sum(recent) / len(recent):.4f} "
                 f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_seconds": seconds, "seconds_per_step": seconds / max(1, len(batches)), "train_loss": losses,
            "final_train_loss": sum(tail) / len(tail), "finite": all(math.isfinite(x) for x in losses)}


@torch.no_grad()
def evaluate(model: HfExtForCausalLM, sets: dict, processor) -> dict:
    """Accuracy of greedy ``generate()`` (one new token) on every question of every held-out canvas, each question
    given the canvas and the earlier questions with their true answers (the training format). One forward pass of
    the whole text also gives the argmax at every answer position (teacher forcing), which must pick the same tokens:
    a check of generate()'s positions."""
    tokenizer = processor.tokenizer
    results = {}
    for (size, beyond), entry in sets.items():
        kinds = [BEYOND] if beyond else list(KINDS)  # beyond sets: only their first ("at") question counts
        correct = {kind: 0 for kind in kinds}
        agree = total = 0
        predictions = {kind: [] for kind in kinds}
        for batch in entry["batches"]:
            positions, answers = batch["answer_positions"], batch["answer_ids"]
            logits = model(**model_inputs(batch)).logits
            for index, kind in enumerate(kinds):
                position = int(positions[index])
                generated = model.generate(**model_inputs(batch, length=position), max_new_tokens=1, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                predicted = generated[:, position]
                correct[kind] += int((predicted == answers[:, index]).sum())
                agree += int((predicted == logits[:, position - 1].argmax(dim=-1)).sum())
                predictions[kind] += tokenizer.convert_ids_to_tokens(predicted.tolist())
            total += len(answers)
        for kind in kinds:
            results[(size, kind)] = {"accuracy": 100.0 * correct[kind] / total, "correct": correct[kind],
                                     "questions": total, "predictions": predictions[kind]}
        results[(size, "generate_matches_argmax" + ("_beyond" if beyond else ""))] = {
            "agree": agree, "of": total * len(kinds)}
    return results


def _accuracy_table(results: dict) -> dict:
    """{size: {kind: accuracy %}} from `evaluate`'s records (JSON-friendly string keys)."""
    table = {}
    for (size, kind), record in results.items():
        if "accuracy" in record:
            table.setdefault(str(size), {})[kind] = record["accuracy"]
    return table


def train_and_evaluate(layouts: list[str], settings: dict) -> dict:
    """In one process: build the training batches and evaluation sets once, then train and evaluate each layout."""
    started = time.perf_counter()
    processor = build_processor(patch_size=CELL, image_channels=1)
    pools = split_digits(settings["eval_fraction"], settings["split_seed"])
    batches, data_digest = training_batches(settings, processor, pools["train"])
    sets = evaluation_sets(settings, processor, pools["eval"])
    data_seconds = time.perf_counter() - started
    _log(f"  data for {', '.join(layouts)}: {len(batches)} batches of {settings['batch_size']} canvases "
         f"({batches[0]['input_ids'].shape[1]} tokens each) and the evaluation sets ({data_seconds:.0f} s)")
    records = {}
    for layout in layouts:
        model = build_model(layout, settings, processor, settings["seed"])
        record = {"initial_weights_digest": weights_digest(model), **train(model, batches, settings, layout)}
        evaluation_started = time.perf_counter()
        results = evaluate(model, sets, processor)
        record["eval_seconds"] = time.perf_counter() - evaluation_started
        record["accuracy"] = _accuracy_table(results)
        record["generate_matches_argmax"] = {f"{size}/{kind}": value for (size, kind), value in results.items()
                                             if kind.startswith("generate_matches_argmax")}
        record["predictions"] = {f"{size}/{kind}": value["predictions"] for (size, kind), value in results.items()
                                 if "predictions" in value}
        records[layout] = record
        overall = {size: sum(by_kind[k] for k in KINDS) / len(KINDS) for size, by_kind in record["accuracy"].items()}
        _log(f"  {layout}: overall accuracy by canvas size {({s: round(a, 1) for s, a in overall.items()})} "
             f"(train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s)")
    answers = {f"{size}/{'beyond' if beyond else 'main'}": entry["answers"] for (size, beyond), entry in sets.items()}
    return {"records": records, "data_digest": data_digest, "data_seconds": data_seconds,
            "train_digits": len(pools["train"].labels), "eval_digits": len(pools["eval"].labels),
            "digit_split_disjoint": not set(pools["train"].indices.tolist()) & set(pools["eval"].indices.tolist()),
            "eval_answers": answers, "tokens_per_training_sequence": batches[0]["input_ids"].shape[1]}


def _worker(arguments_path: str, output_path: str) -> None:
    """Entry point of a worker process (see `run_workers`)."""
    arguments = json.loads(Path(arguments_path).read_text())
    torch.set_num_threads(arguments["settings"]["threads"])
    Path(output_path).write_text(json.dumps(train_and_evaluate(arguments["layouts"], arguments["settings"])))


def run_workers(groups: list[list[str]], settings: dict) -> list[dict]:
    """`train_and_evaluate` for each group of layouts, the groups in parallel processes (one per CPU core: a
    training step of this small model gains nothing from a second thread, while two processes use both cores).
    Every process builds the same batches from the same seeds; the digests are compared afterwards."""
    if len(groups) == 1:
        return [train_and_evaluate(groups[0], settings)]
    with tempfile.TemporaryDirectory() as directory:
        processes, outputs = [], []
        for index, layouts in enumerate(groups):
            arguments, output = Path(directory) / f"arguments{index}.json", Path(directory) / f"output{index}.json"
            arguments.write_text(json.dumps({"layouts": layouts, "settings": settings}))
            outputs.append(output)
            processes.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                               str(arguments), str(output)]))
        codes = [process.wait() for process in processes]
        if any(codes):
            raise RuntimeError(f"worker processes failed with exit codes {codes}")
        return [json.loads(output.read_text()) for output in outputs]


# ----------------------------------------------------------------------------------------------------------------
# Report


def positions_example(settings: dict) -> dict:
    """Every layout's rotary positions of a small example: a 2×3 canvas and a question after it."""
    processor = build_processor(patch_size=CELL, image_channels=1)
    batch = processor(text=["<image> what is at row 1 col 2 ?"], images=[[torch.zeros(2 * CELL, 3 * CELL)]])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    positions = {}
    for layout in settings["layouts"]:
        model = build_model(layout, {**settings, "model": {**settings["model"], "num_hidden_layers": 1}}, processor, 0)
        ids = model.model.get_position_ids(batch["input_ids"], batch["image_grid_hw"], batch["attention_mask"])
        positions[layout] = [[float(x) for x in axis[0].tolist()] for axis in ids]
    return {"canvas": "2 rows × 3 columns", "tokens": tokens, "positions": positions,
            "axes": {"flatten": ["1-D"], "mrope": ["time", "row", "column"], "rope_tie_v1": ["row", "column"],
                     "rope_tie_v2": ["row", "column"]}}


def baselines(answers: dict) -> dict:
    """Per canvas size and question type: the best constant answer (majority) on the evaluation set, and chance."""
    table = {}
    for key, rows in answers.items():
        size, which = key.split("/")
        kinds = [BEYOND] if which == "beyond" else list(KINDS)
        for index, kind in enumerate(kinds):
            column = [row[index] for row in rows]
            majority = max(set(column), key=column.count)
            table.setdefault(size, {})[kind] = {"majority_answer": majority,
                                                "majority_accuracy": 100.0 * column.count(majority) / len(column),
                                                "chance": 100.0 / ANSWER_OPTIONS[kind]}
    return table


def overall(by_kind: dict) -> float:
    """The overall accuracy: mean over the four question types (each has the same number of questions)."""
    return sum(by_kind[kind] for kind in KINDS) / len(KINDS)


def window_means(values: list[float], window: int) -> list[float]:
    """Means of consecutive windows of ``window`` values (the last one may be shorter), rounded for the JSON file."""
    chunks = [values[i:i + window] for i in range(0, len(values), window)]
    return [round(sum(chunk) / len(chunk), 5) for chunk in chunks]


def accuracy_metrics(accuracy: dict, settings: dict) -> dict:
    metrics = {}
    for size in settings["eval_sizes"]:
        key = str(size)
        note = " (trained size)" if size == settings["train_size"] else ""
        candidate, peer = overall(accuracy["rope_tie_v2"][key]), overall(accuracy["flatten"][key])
        metrics[f"overall accuracy {size}×{size}{note}: rope_tie_v2 vs flatten"] = {
            "description": f"mean accuracy over the four question types on held-out {size}×{size} canvases, model "
                           f"trained on {settings['train_size']}×{settings['train_size']} canvases",
            "unit": "% acc",
            "candidate": candidate,
            "peer": peer,
            "speed_ratio": candidate / peer if peer > 0 else float("inf"),
            "ratio_definition": "RoPE-Tie-v2 accuracy / flatten accuracy; > 1: RoPE-Tie-v2 is better",
            "goal": None,
            "min_speed_ratio": None,
            "passed": None,
        }
    return metrics


def markdown_table(accuracy: dict, base: dict, records: dict, settings: dict, parameters: int) -> str:
    train = settings["train_size"]
    lines = [
        f"Accuracy (%) of greedy `generate()` on held-out canvases ({settings['eval_canvases']} per size, digit images "
        f"never seen in training), one model per layout trained on {train}×{train} canvases only: "
        f"{parameters / 1e6:.2f} M parameters, {settings['steps']} steps of {settings['batch_size']} canvases × 4 "
        f"questions, same initial weights and batches for every layout. Overall = mean of the four types; "
        f"\"at (beyond)\" asks about a row or column > {train} (numbers never used as coordinates in training). "
        f"Standard error of one cell ≤ {50 / math.sqrt(settings['eval_canvases']):.1f} points.",
        "",
        "| layout | canvas | overall | at | count | left_of | above | at (beyond) | final train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for layout, by_size in accuracy.items():
        for size in settings["eval_sizes"]:
            cells = by_size[str(size)]
            beyond = f"{cells[BEYOND]:.1f}" if BEYOND in cells else "—"
            label = f"{size}×{size}" + (" (trained)" if size == train else "")
            lines.append(f"| {layout} | {label} | **{overall(cells):.1f}** | {cells['at']:.1f} | {cells['count']:.1f} "
                         f"| {cells['left_of']:.1f} | {cells['above']:.1f} | {beyond} | "
                         f"{records[layout]['final_train_loss']:.3f} |")
    for size in settings["eval_sizes"]:
        cells = base[str(size)]
        majority = {kind: cells[kind]["majority_accuracy"] for kind in cells}
        beyond = f"{majority[BEYOND]:.1f}" if BEYOND in majority else "—"
        lines.append(f"| majority answer | {size}×{size} | {overall(majority):.1f} | {majority['at']:.1f} | "
                     f"{majority['count']:.1f} | {majority['left_of']:.1f} | {majority['above']:.1f} | {beyond} "
                     "| — |")
    lines += ["", interpretation(accuracy, base, settings), "",
              "Command: `hf-ext bench ropetie_digit_canvas` (protocol in the script's docstring; "
              "`benchmarks/results/ropetie_digit_canvas.json` has every number, the training losses and the "
              "positions of a small example in each layout)."]
    return "\n".join(lines)


def _neighbour_mean(by_kind: dict) -> float:
    return (by_kind["left_of"] + by_kind["above"]) / 2


def interpretation(accuracy: dict, base: dict, settings: dict, learned: float = 80.0) -> str:
    """A few sentences read off the numbers (generated, so that they always match the table above them)."""
    train, sizes = settings["train_size"], settings["eval_sizes"]
    larger = [s for s in sizes if s > train]
    at_train = {layout: overall(by_size[str(train)]) for layout, by_size in accuracy.items()}
    weak = sorted({kind for by_size in accuracy.values() for kind in KINDS if by_size[str(train)][kind] < learned})
    sentences = [
        f"At the trained size the layouts reach {min(at_train.values()):.1f}–{max(at_train.values()):.1f} % overall "
        f"(best: {max(at_train, key=at_train.get)})"
        + (f"; {', '.join(weak)} stayed below {learned:.0f} % for at least one layout in this budget, so their "
           "off-size numbers say little" if weak else f"; every question type is above {learned:.0f} %") + "."]
    for size in larger:
        scores = {layout: overall(by_size[str(size)]) for layout, by_size in accuracy.items()}
        majority = overall({k: v["majority_accuracy"] for k, v in base[str(size)].items()})
        best = max(scores, key=scores.get)
        ranking = sorted(scores, key=scores.get, reverse=True)
        sentences.append(f"At {size}×{size}: {min(scores.values()):.1f}–{max(scores.values()):.1f} % overall "
                         f"against {majority:.1f} % for always giving the majority answer; best {best}, RoPE-Tie-v2 "
                         f"{scores['rope_tie_v2']:.1f} % (rank {ranking.index('rope_tie_v2') + 1} of {len(scores)}).")
    if larger:
        def row(by_size: dict) -> str:
            return " / ".join(f"{_neighbour_mean(by_size[str(size)]):.1f}" for size in sizes)

        majority = {str(size): {k: v["majority_accuracy"] for k, v in base[str(size)].items()} for size in sizes}
        sentences.append(
            f"Neighbour questions (mean of left_of and above, whose geometry mrope and rope_tie_v2 keep fixed at every "
            f"size) at {' / '.join(f'{s}×{s}' for s in sizes)}: "
            + ", ".join(f"{layout} {row(by_size)}" for layout, by_size in accuracy.items())
            + f" %; majority answer {row(majority)} %.")
    if larger:
        v2_best = all(max(accuracy, key=lambda l: overall(accuracy[l][str(s)])) == "rope_tie_v2" for s in larger)
        near_chance = all(max(overall(by_size[str(s)]) for by_size in accuracy.values())
                          <= overall({k: v["majority_accuracy"] for k, v in base[str(s)].items()}) + 10 for s in larger)
        sentences.append(
            ("RoPE-Tie-v2 is the best layout at every larger canvas, as the blog expects"
             if v2_best else "RoPE-Tie-v2 is not the best layout at every larger canvas, so this run does not "
                             "support the blog's expectation that it extrapolates best")
            + ("; no layout extrapolates in this setting: off the trained size all are within 10 points of the "
               "majority-answer baseline." if near_chance else "."))
    return " ".join(sentences)


def plot(path: Path, accuracy: dict, base: dict, settings: dict, title: str) -> Path | None:
    """Accuracy vs canvas size, one line per layout, per question type and overall."""
    plt = pyplot()
    if plt is None:
        return None
    panels = ["overall", *KINDS]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharey=True)
    sizes = settings["eval_sizes"]

    def value(by_kind: dict, panel: str) -> float:
        return overall(by_kind) if panel == "overall" else by_kind[panel]

    for axis, panel in zip(axes, panels):
        for layout, by_size in accuracy.items():
            axis.plot(sizes, [value(by_size[str(s)], panel) for s in sizes], marker="o", label=layout)
        majority = [value({k: v["majority_accuracy"] for k, v in base[str(s)].items()}, panel) for s in sizes]
        axis.plot(sizes, majority, linestyle="--", color="grey", label="majority answer")
        axis.axvline(settings["train_size"], color="grey", linestyle=":", linewidth=1)
        axis.set_xticks(sizes, [f"{s}×{s}" for s in sizes])
        axis.set_title(panel)
        axis.set_xlabel("canvas (dotted: trained size)")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def run(settings: dict, *, quick: bool = False, benchmarks_dir: Path = BENCH_DIR) -> dict:
    """Train and evaluate every layout; the result document, saved under ``benchmarks_dir/results``."""
    started = time.perf_counter()
    settings = copy.deepcopy(settings)
    unknown = set(settings["layouts"]) - set(LAYOUTS)
    if unknown or "flatten" not in settings["layouts"] or "rope_tie_v2" not in settings["layouts"]:
        raise ValueError(f"layouts must be among {list(LAYOUTS)} and include flatten and rope_tie_v2, got "
                         f"{settings['layouts']}")
    threads_before = torch.get_num_threads()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # see the module docstring
    settings.update(threads=configure_threads(), device="cpu", dtype="float32")
    torch.set_num_threads(threads_before)
    workers = max(1, min(settings["workers"], len(settings["layouts"])))
    groups = [settings["layouts"][i::workers] for i in range(workers)]
    _log(f"{NAME}: layouts {settings['layouts']} in {workers} process(es) {groups}, {settings['threads']} thread(s) "
         f"each; trained on {settings['train_size']}×{settings['train_size']} canvases, evaluated on "
         f"{settings['eval_sizes']}")
    outputs = run_workers(groups, settings)
    records = {layout: output["records"][layout] for layout in settings["layouts"] for output in outputs
               if layout in output["records"]}
    first = outputs[0]
    accuracy = {layout: record["accuracy"] for layout, record in records.items()}
    base = baselines(first["eval_answers"])
    processor = build_processor(patch_size=CELL, image_channels=1)
    parameters = sum(p.numel() for p in build_model("flatten", settings, processor, settings["seed"]).parameters())
    agreement = {layout: [sum(v["agree"] for v in r["generate_matches_argmax"].values()),
                          sum(v["of"] for v in r["generate_matches_argmax"].values())] for layout, r in records.items()}
    checks = {
        "same_data_order": len({output["data_digest"] for output in outputs}) == 1,
        "data_digest": first["data_digest"],
        "same_initial_weights": len({r["initial_weights_digest"] for r in records.values()}) == 1,
        "digit_split_disjoint": all(output["digit_split_disjoint"] for output in outputs),
        "generate_matches_argmax": {layout: f"{agree}/{of}" for layout, (agree, of) in agreement.items()},
        "generate_matches_argmax_all": all(agree == of for agree, of in agreement.values()),
        "all_finite": all(r["finite"] for r in records.values()),
    }
    for name in ("same_data_order", "same_initial_weights", "digit_split_disjoint"):
        if not checks[name]:
            raise AssertionError(f"check {name} failed: the layouts were not compared on equal terms")
    settings["parameters"] = parameters
    settings["data"] = {"source": "sklearn.datasets.load_digits (1797 8×8 images)",
                        "train_digit_images": first["train_digits"], "eval_digit_images": first["eval_digits"],
                        "tokens_per_training_sequence": first["tokens_per_training_sequence"]}

    _log(f"\n{'layout':<14}" + "".join(f"{f'{s}×{s}':>10}" for s in settings["eval_sizes"]) + "   (overall %)")
    for layout, by_size in accuracy.items():
        _log(f"{layout:<14}" + "".join(f"{overall(by_size[str(s)]):>10.1f}" for s in settings["eval_sizes"]))

    result = make_result(NAME, candidate=CANDIDATE, peer=PEER, settings=settings,
                         metrics=accuracy_metrics(accuracy, settings), checks=checks, quick=quick)
    result["tables"] = {
        "units": "accuracy in % of greedy generate() answers; keys: canvas size, then question type",
        "accuracy": accuracy,
        "overall": {layout: {size: overall(by_kind) for size, by_kind in by_size.items()}
                    for layout, by_size in accuracy.items()},
        "baselines": base,
        "training": {layout: {key: r[key] for key in ("train_seconds", "seconds_per_step", "final_train_loss",
                                                      "eval_seconds", "initial_weights_digest")}
                     for layout, r in records.items()},
        "train_loss_per_window": {"window_steps": LOSS_WINDOW, **{
            layout: window_means(r["train_loss"], LOSS_WINDOW) for layout, r in records.items()}},
        "data_seconds": [output["data_seconds"] for output in outputs],
        "positions_example": positions_example(settings),
        # every generated answer, space-separated in the order of the evaluation canvases
        "predictions": {layout: {key: " ".join(words) for key, words in r["predictions"].items()}
                        for layout, r in records.items()},
    }
    result["markdown_tables"] = [markdown_table(accuracy, base, records, settings, parameters)]
    results_dir = Path(benchmarks_dir) / "results" / ("quick" if quick else "")
    picture = plot(results_dir / f"{NAME}.png", accuracy, base, settings,
                   f"Digit canvas VQA, trained on {settings['train_size']}×{settings['train_size']}: held-out "
                   "accuracy vs canvas size")
    result["plots"] = [str(picture.relative_to(benchmarks_dir))] if picture and not quick else []
    result["total_seconds"] = time.perf_counter() - started
    path = save_result(result, benchmarks_dir)
    _log(f"results in {path} ({result['total_seconds']:.0f} s in all)")
    return result


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``steps=4000``)."""
    return run(benchmark_settings(FULL, QUICK, quick, overrides), quick=quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("ARGUMENTS_JSON", "OUTPUT_JSON"),
                        help="internal: one worker process of `run_workers`")
    arguments = parser.parse_args()
    if arguments.worker:
        _worker(*arguments.worker)
    else:
        main(quick=arguments.quick)
