"""Fine-tuning data from the Python 3.11 documentation sources, for `lora_finetuning` and `lora_ga_init_memory`.

* Tokenizers behind one small interface: `ByteTokenizer` (UTF-8 bytes, for the tiny quick-mode model) and
  `HfTokenizer` (a transformers tokenizer), and `tiny_llama`, a small random Llama for quick runs.
* reStructuredText reduced to text: `clean_rst`, `glossary_entries` (term, definition) and `section_summaries`
  (heading, first sentence).
* `build_tasks`: the ``text`` task (consecutive token blocks, labels = input_ids) and the ``instruction`` task
  (glossary definitions and section summaries, loss on the answer only), split by file into training and evaluation.
* `tutorial_batches` (blocks of the Python tutorial) and `random_batches` (random token ids).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .assets import python_doc_files

IGNORE_INDEX = -100
GLOSSARY = "glossary.rst.txt"
GLOSSARY_PROMPT = "Define the following term from the Python documentation: {term}\nAnswer:"
SECTION_PROMPT = "Summarise the section titled '{heading}' of the Python documentation in one sentence.\nAnswer:"
MIN_ANSWER_TOKENS = 4
TASKS = ("text", "instruction")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers and a tiny model


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


def tiny_llama(config: dict, seed: int = 0):
    """A random `LlamaForCausalLM` of ``config`` (LlamaConfig fields) drawn after ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


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
    """The ``text`` and ``instruction`` tasks of ``settings["tasks"]``, sized for ``steps`` batches.

    Both are split **by file**: the documentation files (the glossary kept out) are shuffled with ``seed``, the first
    ones go to the evaluation sets until those are full, the next ones to training. ``text``: consecutive
    ``block_size``-token blocks (at most ``max_blocks_per_file`` per file). ``instruction``: alternating glossary
    definitions (the glossary's terms shuffled with ``seed + 1``, the first half of the eval quota held out) and
    section summaries (at most ``max_sections_per_file`` per file), each at most ``block_size`` tokens.
    """
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
# Plain language-model batches


def tutorial_batches(tokenizer, count: int, batch_size: int, length: int) -> list[dict]:
    """``count`` batches of ``batch_size`` × ``length`` consecutive tokens of the Python tutorial (plain English
    prose, ``tutorial/*.rst.txt``), labels = input_ids; ``tokenizer`` is a transformers tokenizer."""
    needed = count * batch_size * length
    ids: list[int] = []
    for path in (p for p in python_doc_files() if p.parent.name == "tutorial"):
        ids += tokenizer(path.read_text(encoding="utf-8", errors="replace") + "\n\n",
                         add_special_tokens=False).input_ids
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"The Python tutorial holds {len(ids)} tokens; {needed} are needed.")
    rows = torch.tensor(ids[:needed]).view(count, batch_size, length)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def random_batches(vocab_size: int, count: int, batch_size: int, length: int, seed: int = 1) -> list[dict]:
    """``count`` batches of uniformly random token ids (a generator seeded with ``seed``), labels = input_ids."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab_size, (count, batch_size, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]
