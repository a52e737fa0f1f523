"""A tiny image-text world for RoPE-Tie experiments: scikit-learn's 8×8 digit images on a canvas, with questions.

`build_processor()` gives an `HfExtProcessor` over a word-level tokenizer of this world's vocabulary (no download),
so a vision-language HfExt model can be built, trained and saved entirely offline (the demo's RoPE-Tie step and the
README example use it). The rest builds the data of the `ropetie_digit_canvas` benchmark: the digit split, canvases
with their four one-word questions, rendering, encoded batches with answer labels, and answer baselines.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from hf_ext import HfExtProcessor

SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<image>", "<image_patch>", "<image_start>", "<image_end>"]
WORDS = [str(n) for n in range(10)] + ["none", "what", "is", "at", "row", "col", "how", "many", "left", "right",
                                        "of", "above", "below", "?", ":"]


def build_tokenizer():
    """A whitespace word-level fast tokenizer of `WORDS` and `SPECIAL_TOKENS` (padding on the left, for generation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    return tokenizer


def build_processor(patch_size: int = 8, image_channels: int = 1) -> HfExtProcessor:
    """The processor of a digit-canvas model: 8-pixel patches (one digit cell each) of grey canvases by default."""
    return HfExtProcessor(build_tokenizer(), patch_size=patch_size, image_channels=image_channels)


CELL = 8  # pixels per cell side = the patch size: one digit image is exactly one patch token
IGNORE_INDEX = -100
MAX_COUNT = 9  # count answers are single digit tokens
KINDS = ("at", "count", "left_of", "above")  # the questions of every canvas, in this order
BEYOND = "at_beyond"  # an "at" question about a row or column beyond the trained size (reported apart)
# How many different answers each question type has (chance = 1 / that): "at" a digit or "none"; "count" 0..9;
# left_of / above "none" or one of the 8 digits that are neither of the two asked-about (unique) digits.
ANSWER_OPTIONS = {"at": 11, BEYOND: 11, "count": MAX_COUNT + 1, "left_of": 9, "above": 9}


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
# Where the questions stand relative to the image (Canvas.text). "after" puts every question right next to the
# image's end, so the text-to-image distance grows with the image; "before" and "both" also separate the question
# from the image by the whole image, which is what tells the position layouts apart.
QUESTION_PLACEMENTS = ("after", "before", "both")
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

    def text(self, placement: str = "after") -> str:
        """The whole training text. `placement` (QUESTION_PLACEMENTS) says where the questions stand: "after" the
        image, each followed by its answer; "before" it, all four, with the four answers after the image in the same
        order; or "both": all four before the image and again after it, each followed by its answer."""
        answered = [f"{q.text} {q.answer}" for q in self.questions]
        if placement == "after":
            return " ".join(["<image>"] + answered)
        asked = [q.text for q in self.questions]
        if placement == "before":
            return " ".join(asked + ["<image>"] + [q.answer for q in self.questions])
        if placement == "both":
            return " ".join(asked + ["<image>"] + answered)
        raise ValueError(f"`placement` must be one of {list(QUESTION_PLACEMENTS)}, got {placement!r}")


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


def encode(processor, examples: list[tuple[Canvas, torch.Tensor]], placement: str = "after") -> dict:
    """Model inputs of whole canvas texts with <eos> appended, ``labels`` on every answer and on <eos>, and the
    ``answer_positions`` [batch, 4] (the index of each answer token; the logits one position earlier predict it).

    All canvases of a batch have the same size and every question type a fixed number of words, so the rows have
    equal length and the answers sit at the same positions in every row.
    """
    tokenizer = processor.tokenizer
    texts = [canvas.text(placement) for canvas, _ in examples]
    batch = dict(processor(text=texts, images=[[image] for _, image in examples]))
    if not bool(batch["attention_mask"].all()):
        raise ValueError("the canvases of a batch must have one size (rows of equal length)")
    eos = torch.full((len(texts), 1), tokenizer.eos_token_id)
    batch["input_ids"] = torch.cat([batch["input_ids"], eos], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(eos)], dim=1)
    # Word i of the text after <image> sits `words - i` positions before the <eos> column (one token per word).
    words = texts[0].split("<image>", 1)[1].split()
    if placement == "before":  # the answers alone follow the image
        word_index = list(range(len(examples[0][0].questions)))
    else:  # each answer follows its question
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


def compact(batch: dict) -> dict:
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
        batch = compact(encode(processor, examples, settings.get("question_placement", "after")))
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
            placement = settings.get("question_placement", "after")
            batches = [compact(encode(processor, examples[i:i + batch_size], placement))
                       for i in range(0, n, batch_size)]
            sets[(size, beyond)] = {"batches": batches,
                                    "answers": [[q.answer for q in canvas.questions] for canvas, _ in examples]}
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def baselines(answers: dict) -> dict:
    """Per canvas size and question type: the best constant answer (majority) on the evaluation set, and chance."""
    table = {}
    for key, rows in answers.items():
        size, which = key.split("/")
        kinds = [BEYOND] if which == "beyond" else list(KINDS)
        for index, kind in enumerate(kinds):
            column = [row[index] for row in rows]
            majority = max(sorted(set(column)), key=column.count)  # ties: the first in sorted order, every run
            table.setdefault(size, {})[kind] = {"majority_answer": majority,
                                                "majority_accuracy": 100.0 * column.count(majority) / len(column),
                                                "chance": 100.0 / ANSWER_OPTIONS[kind]}
    return table


def overall(by_kind: dict) -> float:
    """The overall accuracy: mean over the four question types (each has the same number of questions)."""
    return sum(by_kind[kind] for kind in KINDS) / len(KINDS)
