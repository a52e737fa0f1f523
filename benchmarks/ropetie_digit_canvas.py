"""RoPE-Tie on real images: a tiny vision-language model answering questions about digits on a canvas.

DOCSTRING-PLACEHOLDER
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_ext import HfExtConfig, HfExtForCausalLM
from hf_ext.benchmarking import (THREADS_ENVIRONMENT_VARIABLE, benchmark_settings, configure_threads, make_result,
                                 save_result)
from hf_ext.digit_canvas import build_processor

NAME = "ropetie_digit_canvas"
BENCH_DIR = Path(__file__).resolve().parent
LAYOUTS = ("flatten", "mrope", "rope_tie_v1", "rope_tie_v2")
CANDIDATE = "hf_ext RoPE-Tie-v2 (position_layout='rope_tie_v2')"
PEER = "flatten (RoPE-1D over token order), same initial weights, data order and budget"
CELL = 8  # pixels per cell side = the patch size: one digit image is exactly one patch token
IGNORE_INDEX = -100
MAX_COUNT = 9  # count answers are single digit tokens
# The question types of the overall accuracy; "at_beyond" (a cell outside the trained rows/columns) is reported apart.
MAIN_KINDS = ("at", "count", "left_of", "above")
BEYOND_KIND = "at_beyond"

FULL = {
    "layouts": list(LAYOUTS),
    "train_size": 4,
    "eval_sizes": [4, 6, 8],
    "empty_probability": 0.25,
    "eval_fraction": 0.3,
    "split_seed": 0,
    "data_seed": 0,
    "eval_seed": 1,
    "seeds": [0],
    "model": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4},
    "steps": 1500,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "log_every": 100,
    "eval_questions_per_type": 500,
    "eval_batch_size": 125,
}
QUICK = {
    **FULL,
    "layouts": list(LAYOUTS),
    "eval_sizes": [4, 5],
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "steps": 3,
    "batch_size": 8,
    "warmup_steps": 1,
    "log_every": 1,
    "eval_questions_per_type": 8,
    "eval_batch_size": 8,
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

    def of_digit(self, digit: int) -> list[int]:
        """Positions (in this pool) of the images of ``digit``."""
        return (self.labels == digit).nonzero().flatten().tolist()


def split_digits(eval_fraction: float, seed: int) -> dict[str, DigitPool]:
    """scikit-learn's 1797 8×8 digits, split by image with a fixed permutation: ``train`` and ``eval`` never share an
    image, so evaluation canvases are drawn with digit images the model has not seen."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # pixel values are 0..16
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_eval = round(eval_fraction * len(labels))
    parts = {"eval": order[:n_eval].sort().values, "train": order[n_eval:].sort().values}
    return {name: DigitPool(images[index], labels[index], index) for name, index in parts.items()}


# ----------------------------------------------------------------------------------------------------------------
# Canvases and questions
#
# A canvas is a size × size grid of cells (row 1 at the top, column 1 on the left); a cell holds a digit or is empty
# (None). Every question is answered by one word: a digit or "none".

Cells = tuple[tuple[int | None, ...], ...]


@dataclass(frozen=True)
class Question:
    kind: str  # "at", "at_beyond", "count", "left_of" or "above"
    cells: Cells
    prompt: str  # e.g. "<image> what is at row 2 col 3 ?"
    answer: str  # a digit "0".."9" or "none"


def random_cells(rng: random.Random, size: int, empty_probability: float, exclude: tuple[int, ...] = ()) -> list:
    """A size × size grid: each cell empty with ``empty_probability``, else a uniform digit not in ``exclude``."""
    allowed = [d for d in range(10) if d not in exclude]
    return [[None if rng.random() < empty_probability else rng.choice(allowed) for _ in range(size)]
            for _ in range(size)]


def _freeze(grid: list) -> Cells:
    return tuple(tuple(row) for row in grid)


def _word(value: int | None) -> str:
    return "none" if value is None else str(value)


def question_at(rng: random.Random, size: int, empty_probability: float, ask_limit: int,
                beyond: bool = False) -> Question:
    """"what is at row r col c ?": the digit in that cell or "none".

    Rows and columns are asked only up to ``ask_limit`` (the trained canvas size), so that the numbers in the question
    are ones the model was trained on; ``beyond=True`` asks instead about a cell with row or column > ask_limit.
    """
    grid = random_cells(rng, size, empty_probability)
    if beyond:
        if size <= ask_limit:
            raise ValueError(f"no cell beyond row/column {ask_limit} on a {size}×{size} canvas")
        cells = [(r, c) for r in range(1, size + 1) for c in range(1, size + 1) if max(r, c) > ask_limit]
        row, col = rng.choice(cells)
    else:
        limit = min(size, ask_limit)
        row, col = rng.randint(1, limit), rng.randint(1, limit)
    return Question(BEYOND_KIND if beyond else "at", _freeze(grid), f"<image> what is at row {row} col {col} ?",
                    _word(grid[row - 1][col - 1]))


def question_count(rng: random.Random, size: int, empty_probability: float) -> Question:
    """"how many d ?": the count k is drawn uniformly from 0..9 first (then k cells get d, the others hold other
    digits or nothing), so that every canvas size has the same answer distribution and the answer is one token."""
    digit = rng.randrange(10)
    count = rng.randint(0, min(MAX_COUNT, size * size))
    grid = random_cells(rng, size, empty_probability, exclude=(digit,))
    for index in rng.sample(range(size * size), count):
        grid[index // size][index % size] = digit
    return Question("count", _freeze(grid), f"<image> how many {digit} ?", str(count))


NEIGHBOUR_WORDS = {"left_of": "left of", "above": "above"}


def question_neighbour(rng: random.Random, size: int, empty_probability: float, kind: str) -> Question:
    """"what is left of d ?" / "what is above d ?" with d on the canvas exactly once: the digit in the adjacent cell
    (same row, one column to the left / same column, one row up), or "none" (that cell is empty, or d is on the
    first column / row).

    The answer is drawn first, uniformly from "none" and the nine digits other than d, so that "none" does not
    dominate; half of the "none" answers put d on the edge, half next to an empty cell.
    """
    if kind not in NEIGHBOUR_WORDS:
        raise ValueError(f"kind must be one of {list(NEIGHBOUR_WORDS)}, got {kind!r}")
    digit = rng.randrange(10)
    answer = rng.choice([None] + [d for d in range(10) if d != digit])
    grid = random_cells(rng, size, empty_probability, exclude=(digit,))
    on_edge = answer is None and rng.random() < 0.5
    # (along, across): index along the direction of the question (column for left_of, row for above), 0-based
    along = 0 if on_edge else rng.randrange(1, size)
    across = rng.randrange(size)
    place = (lambda a, b: (b, a)) if kind == "left_of" else (lambda a, b: (a, b))  # -> (row, col)
    row, col = place(along, across)
    grid[row][col] = digit
    if not on_edge:
        n_row, n_col = place(along - 1, across)
        grid[n_row][n_col] = answer
    return Question(kind, _freeze(grid), f"<image> what is {NEIGHBOUR_WORDS[kind]} {digit} ?", _word(answer))


def make_question(kind: str, rng: random.Random, size: int, empty_probability: float, ask_limit: int) -> Question:
    if kind in ("at", BEYOND_KIND):
        return question_at(rng, size, empty_probability, ask_limit, beyond=kind == BEYOND_KIND)
    if kind == "count":
        return question_count(rng, size, empty_probability)
    return question_neighbour(rng, size, empty_probability, kind)


def render(cells: Cells, pool: DigitPool, rng: random.Random) -> tuple[torch.Tensor, list]:
    """The canvas [8·size, 8·size] (zeros for empty cells) and which pool image fills each cell (None: empty)."""
    size = len(cells)
    canvas = torch.zeros(CELL * size, CELL * size)
    image_ids = []
    by_digit = {d: pool.of_digit(d) for d in {v for row in cells for v in row if v is not None}}
    for r, row in enumerate(cells):
        ids = []
        for c, value in enumerate(row):
            index = None if value is None else rng.choice(by_digit[value])
            if index is not None:
                canvas[CELL * r:CELL * (r + 1), CELL * c:CELL * (c + 1)] = pool.images[index]
            ids.append(index)
        image_ids.append(ids)
    return canvas, image_ids


def question_set(kinds: list[str], count: int, size: int, pool: DigitPool, seed: int, empty_probability: float,
                 ask_limit: int) -> list[tuple[Question, torch.Tensor]]:
    """``count`` questions (with their rendered canvases), cycling through ``kinds`` so that the types stay balanced."""
    rng = random.Random(seed)
    items = []
    for index in range(count):
        question = make_question(kinds[index % len(kinds)], rng, size, empty_probability, ask_limit)
        items.append((question, render(question.cells, pool, rng)[0]))
    return items


# ----------------------------------------------------------------------------------------------------------------
# Batches


def encode(processor, items: list[tuple[Question, torch.Tensor]], with_answers: bool) -> dict:
    """Processor inputs of the prompts and canvases, plus ``answer_ids``; with ``with_answers`` the answer word and
    <eos> are appended (the prompts are left-padded, so every row ends at the same column) with ``labels`` on just
    those two tokens, the training form."""
    tokenizer = processor.tokenizer
    batch = dict(processor(text=[q.prompt for q, _ in items], images=[[canvas] for _, canvas in items]))
    answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids([q.answer for q, _ in items]))
    if tokenizer.unk_token_id in answer_ids.tolist():
        raise ValueError("an answer word is not in the tokenizer's vocabulary")
    batch["answer_ids"] = answer_ids
    if with_answers:
        eos = torch.full_like(answer_ids, tokenizer.eos_token_id)
        tail = torch.stack([answer_ids, eos], dim=1)
        batch["labels"] = torch.cat([torch.full_like(batch["input_ids"], IGNORE_INDEX), tail], dim=1)
        batch["input_ids"] = torch.cat([batch["input_ids"], tail], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tail)], dim=1)
    return batch


def _compact(batch: dict) -> dict:
    # Canvas pixels are k/16 (scikit-learn's 0..16 levels): stored as uint8 k they take a quarter of the memory, and
    # the training batches of all layouts can be kept (built once, so every layout sees identical batches).
    pixels = batch["pixel_values"] * 16
    if not torch.equal(pixels, pixels.round()):
        raise ValueError("canvas pixels are not multiples of 1/16")
    return {**batch, "pixel_values": pixels.round().to(torch.uint8)}


def _expand(batch: dict) -> dict:
    return {**batch, "pixel_values": batch["pixel_values"].float() / 16}


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in _expand(batch).items() if k not in ("answer_ids", "kinds")}


def training_batches(settings: dict, processor, pool: DigitPool) -> tuple[list[dict], str]:
    """Every training batch (question types cycling within a batch, so each batch is balanced) and a digest of them."""
    batches, digest = [], hashlib.sha256()
    for step in range(settings["steps"]):
        items = question_set(list(MAIN_KINDS), settings["batch_size"], settings["train_size"], pool,
                             seed=settings["data_seed"] * 1_000_003 + step,
                             empty_probability=settings["empty_probability"], ask_limit=settings["train_size"])
        batch = _compact(encode(processor, items, with_answers=True))
        for key in ("input_ids", "pixel_values"):
            digest.update(batch[key].numpy().tobytes())
        batches.append(batch)
    return batches, digest.hexdigest()[:16]


def eval_kinds(size: int, train_size: int) -> list[str]:
    return list(MAIN_KINDS) + ([BEYOND_KIND] if size > train_size else [])


def evaluation_sets(settings: dict, processor, pool: DigitPool) -> dict:
    """Per (size, kind): the questions and their encoded batches (one kind per batch, so no padding), shared by every
    layout."""
    sets = {}
    n, batch_size = settings["eval_questions_per_type"], settings["eval_batch_size"]
    for size in settings["eval_sizes"]:
        for kind_index, kind in enumerate(eval_kinds(size, settings["train_size"])):
            items = question_set([kind], n, size, pool, seed=settings["eval_seed"] * 1_000_003 + 100 * size + kind_index,
                                 empty_probability=settings["empty_probability"], ask_limit=settings["train_size"])
            batches = [_compact(encode(processor, items[i:i + batch_size], with_answers=False))
                       for i in range(0, n, batch_size)]
            sets[(size, kind)] = {"answers": [q.answer for q, _ in items], "batches": batches}
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


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: HfExtForCausalLM, batches: list[dict], settings: dict, label: str) -> dict:
    """AdamW over ``batches`` in order; returns the per-step losses and timings."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, settings["warmup_steps"], len(batches)))
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
            "final_train_loss": sum(tail) / len(tail), "final_train_loss_definition":
            f"mean training loss over the last {len(tail)} steps (answer token and <eos>)",
            "finite": all(math.isfinite(x) for x in losses)}


@torch.no_grad()
def evaluate(model: HfExtForCausalLM, sets: dict, processor) -> dict:
    """Greedy ``generate()`` (one new token) on every evaluation question; also the argmax of a plain forward pass's
    last logits, which must pick the same token (a check of generate's positions)."""
    tokenizer = processor.tokenizer
    results = {}
    for (size, kind), entry in sets.items():
        correct = agree = total = 0
        predictions = []
        for batch in entry["batches"]:
            inputs = model_inputs(batch)
            generated = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
            predicted = generated[:, inputs["input_ids"].shape[1]]
            argmax = model(**inputs).logits[:, -1].argmax(dim=-1)
            correct += int((predicted == batch["answer_ids"]).sum())
            agree += int((predicted == argmax).sum())
            total += len(predicted)
            predictions += tokenizer.convert_ids_to_tokens(predicted.tolist())
        results[(size, kind)] = {"accuracy": 100.0 * correct / total, "correct": correct, "questions": total,
                                 "generate_matches_argmax": agree, "predictions": predictions}
    return results


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``steps=2000``)."""
    return run(benchmark_settings(FULL, QUICK, quick, overrides), quick=quick)
