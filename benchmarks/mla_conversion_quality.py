"""GQA → MLA conversion of SmolLM2-135M: held-out perplexity vs KV-cache bytes per token, before and after healing.

`hf_ext.convert.to_mla` turns a grouped-query-attention model into multi-head latent attention (see its module
docstring): it keeps the highest ``qk_rope_head_dim / 2`` rotary frequencies of every head (one rotary key per KV
group) and factors the remaining ("nope") key dimensions and the values of each layer jointly into a
``kv_lora_rank`` latent, by a plain SVD of the weights or, with ``calibration_input_ids``, by an SVD weighted with
the layer's real inputs (activation-aware). Per token and layer the cache then holds ``kv_lora_rank + n_kv ·
qk_rope_head_dim`` elements instead of ``2 · n_kv · head_dim`` = 2 · 3 · 64 = 384 for SmolLM2-135M. The defaults
(``qk_rope_head_dim = head_dim``, ``kv_lora_rank = n_kv · head_dim``) compute exactly what the source computes; every
smaller setting trades accuracy for cache. This benchmark measures that trade on real text, and how much of it a
short fine-tune ("healing") wins back, compared honestly with the same fine-tune of the unconverted model.

What is measured (all fp32, CPU, `torch.no_grad` for every evaluation):

1. **Perplexity on held-out text** (exp of the token-weighted mean next-token cross-entropy over ``eval_blocks``
   blocks of ``block_size`` tokens) of
   * the original SmolLM2-135M-Instruct (GQA);
   * the exact conversion (defaults): a **check**, not a measurement: the same perplexity and max |Δlogit| over
     every evaluated position ≤ ``exact_tolerance`` (1e-4), and the same KV bytes per token as the original;
   * a ladder of compressed settings ``(qk_rope_head_dim, kv_lora_rank)`` spanning about 25-70 % of the GQA cache,
     each converted twice, training-free: with a plain weight SVD and calibrated on ``calibration_blocks`` blocks
     of the *training* split. For each setting the KV bytes per token (`hf_ext.kv_cache_bytes_per_token`, fp32 and
     bf16) and its fraction of the GQA cache are recorded.
2. **Healing.** The calibrated conversions of the ``heal`` settings are fine-tuned with `hf_ext.optim.Lion` for
   ``heal_steps`` steps of ``heal_batch_size`` × ``block_size`` tokens of the training split (linear warm-up over
   ``warmup_steps``, then constant learning rate ``learning_rate`` = 1e-4; no gradient clipping: Lion's update is a
   sign). In an 8-step probe on the (8, 64) setting, 1e-4 took the perplexity on 8 held-out blocks from 195 to 90,
   3e-5 only to 120; 1e-4 is at the upper end of the usual Lion fine-tuning range, which suits a short heal. **Honesty
   control:** the original GQA model gets the identical fine-tune (same trainable parameter set, batches, order,
   optimizer and hyper-parameters). Fine-tuning on Python documentation lowers the perplexity of *any* model on
   held-out Python documentation, so the fair comparison is healed MLA vs the equally fine-tuned GQA model, not vs
   the untouched original; the RESULTS.md rows compare exactly that.

   Only the attention parameters are trained (``heal_parameters="attention"``: q_proj, kv_a_proj_with_mqa, kv_b_proj,
   o_proj of the MLA layers; q/k/v/o_proj for the GQA control). The conversion changes nothing else, and on the
   shared 2-core machine a training step of 4 × 256 tokens took ~20 s with every parameter trainable (weight
   gradients of the 49k-word tied embedding and of the MLPs, and their Lion updates) against ~9 s for the attention
   alone, which is what lets three healing runs fit in the time budget. ``heal_parameters="all"`` trains everything.
   LoRA-GA was not used: it would need extra gradient passes to initialise, and a rank-limited adapter saves no
   compute over training these few matrices in full.

Data: the Python 3.11 documentation sources (`hf_ext.assets.python_doc_files`, the reStructuredText as it is, no
special tokens), split **by file** (as `lora_finetuning` does): the files are shuffled with ``seed``, the first ones
fill the evaluation set (at most ``max_eval_blocks_per_file`` consecutive blocks per file, so that it spans many
files), the following files the training split (at most ``max_train_blocks_per_file`` blocks per file): first the
calibration blocks, then the healing batches (disjoint from the calibration blocks). ``checks.split_by_file``
confirms that no file contributes to both.

Published training-free numbers, as context (other, 7-8 B models, other data and protocols: not comparable number for
number with SmolLM2-135M; values as quoted in the issue, not re-measured here): TransMLA (Meng et al., 2025,
arXiv 2502.07864) at ~93 % KV-cache compression reports perplexity Llama-2-7B 5.47 → 41.6, Llama-3-8B 6.14 → 25.8,
Qwen2.5-7B 6.85 → 8.41 training-free, recovered to near the original after fine-tuning on 6 B tokens; MHA2MLA
(Ji et al., 2025, arXiv 2502.14837) reduces Llama-2-7B's KV cache by 92.19 % with about 0.5-1 % LongBench drop after
fine-tuning; a user report (JT-Ushio/MHA2MLA issue #24) has Llama-3.2-3B's HellaSwag fall 70.75 → 49.65 after an
MHA2MLA conversion (r = 4 rotary frequencies, d_kv = 8) *and* fine-tuning on the SmolLM corpus. They are stored under
``tables.published`` and shown in a table of their own.

Threads: one torch thread unless ``HF_EXT_BENCH_THREADS`` says otherwise. On the shared 2-core machine (another
developer's tests and benchmark running) a no-grad forward pass of 4 × 256 tokens took ~5.5 s with one thread and
11-14 s with two. The numbers here are perplexities, not speeds.

Results: ``benchmarks/results/mla_conversion_quality.json`` (the ladder under ``tables.ladder``, healing runs with
their training-loss curves under ``tables.healing``), informational RESULTS.md rows (ratio = peer PPL / candidate
PPL, > 1: the MLA model predicts better; no pass/fail goal), a markdown table, and the plot
``benchmarks/results/mla_conversion_quality.png`` (perplexity vs KV bytes per token: plain, calibrated and healed
MLA, the original and the fine-tuned original).

Run with ``hf-ext bench mla_conversion_quality`` (27 minutes, 1634 s, on the shared 2-core machine with one thread:
15 evaluations of 32 × 256 tokens at ~30 s each, three healing runs of 40 steps at ~9 s each, ten conversions of 2 s
plus ~8 s for the calibration forward pass of each calibrated one). ``--quick`` converts a tiny random Llama over
bytes of the same real text (a smoke test of every code path in seconds, not a measurement; written to
``benchmarks/results/quick/``). Keyword arguments
of `main` override entries of `FULL`, e.g. ``main(heal_steps=100)``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_ext
from hf_ext.assets import PYTHON_DOC_SOURCES, python_doc_files
from hf_ext.benchmarking import (
    THREADS_ENVIRONMENT_VARIABLE,
    benchmark_settings,
    configure_threads,
    make_result,
    pyplot,
    save_figure,
    save_result,
)
from hf_ext.optim import Lion

NAME = "mla_conversion_quality"
BENCH_DIR = Path(__file__).resolve().parent
CANDIDATE = "hf_ext.convert.to_mla (MLA, compressed KV cache)"
PEER = "the GQA source model (original, or equally fine-tuned)"

FULL = {
    "model": "smollm2-135m",
    # (qk_rope_head_dim, kv_lora_rank): cache kv_lora_rank + 3 · qk_rope_head_dim of 384 elements per token and layer
    # = 66.7 %, 54.2 %, 45.8 %, 31.3 %, 22.9 % of SmolLM2's GQA cache.
    "ladder": ((32, 160), (16, 160), (16, 128), (8, 96), (8, 64)),
    "heal": ((16, 128), (8, 64)),  # calibrated conversions that get the healing fine-tune
    "block_size": 256,
    "eval_blocks": 32,
    "eval_batch_size": 4,
    "max_eval_blocks_per_file": 2,
    "max_train_blocks_per_file": 4,
    "calibration_blocks": 8,
    "heal_steps": 40,
    "heal_batch_size": 4,
    "heal_parameters": "attention",  # or "all"
    "learning_rate": 1e-4,
    "betas": (0.9, 0.99),
    "weight_decay": 0.01,
    "warmup_steps": 3,
    "exact_tolerance": 1e-4,
    "seed": 0,
}
# A tiny random Llama (head_dim 16, 2 KV heads: a GQA cache of 64 elements per token and layer) over bytes of the
# same real text: every code path in seconds.
TINY_MODEL = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
QUICK = {**FULL, "model": "tiny-llama", "ladder": ((8, 24), (4, 16)), "heal": ((4, 16),), "block_size": 64,
         "eval_blocks": 4, "eval_batch_size": 2, "calibration_blocks": 2, "heal_steps": 3, "heal_batch_size": 2,
         "warmup_steps": 1}

# Published numbers (as quoted in the issue; other models and protocols): context, not a comparison.
PUBLISHED = [
    {"source": "TransMLA (Meng et al., 2025, arXiv 2502.07864)", "model": "Llama-2-7B", "metric": "perplexity",
     "original": 5.47, "converted_training_free": 41.6, "kv_cache_reduction": "~93 %",
     "note": "recovered to near the original after fine-tuning on 6B tokens"},
    {"source": "TransMLA (Meng et al., 2025, arXiv 2502.07864)", "model": "Llama-3-8B", "metric": "perplexity",
     "original": 6.14, "converted_training_free": 25.8, "kv_cache_reduction": "~93 %", "note": ""},
    {"source": "TransMLA (Meng et al., 2025, arXiv 2502.07864)", "model": "Qwen2.5-7B", "metric": "perplexity",
     "original": 6.85, "converted_training_free": 8.41, "kv_cache_reduction": "~93 %", "note": ""},
    {"source": "MHA2MLA (Ji et al., 2025, arXiv 2502.14837)", "model": "Llama-2-7B", "metric": "LongBench",
     "original": None, "converted_training_free": None, "kv_cache_reduction": "92.19 %",
     "note": "about 0.5-1 % LongBench drop after fine-tuning"},
    {"source": "user report, github.com/JT-Ushio/MHA2MLA/issues/24", "model": "Llama-3.2-3B",
     "metric": "HellaSwag accuracy (%)", "original": 70.75, "converted_training_free": None,
     "converted_fine_tuned": 49.65, "kv_cache_reduction": "r = 4, d_kv = 8",
     "note": "after MHA2MLA conversion and fine-tuning on the SmolLM corpus (not training-free)"},
]


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Model and tokenizer


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens (pad 0, bos 1, eos 2): real text for the tiny quick-mode model."""

    name = "bytes (UTF-8, offset 3)"

    def encode(self, text: str) -> list[int]:
        return [byte + 3 for byte in text.encode("utf-8")]


class HfTokenizer:
    """A transformers tokenizer behind the same interface (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = f"{type(tokenizer).__name__}, vocabulary {len(tokenizer)}"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_MODEL)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def load_model(settings: dict):
    """(model in eval mode, tokenizer, description) for ``settings["model"]``."""
    if settings["model"] == "tiny-llama":
        return tiny_llama(settings["seed"]), ByteTokenizer(), "tiny random LlamaForCausalLM " + str(TINY_MODEL)
    if settings["model"] != "smollm2-135m":
        raise ValueError(f"unknown model {settings['model']!r}; known: 'smollm2-135m', 'tiny-llama'")
    from hf_ext.assets import load_smollm2, smollm2_gguf_path

    model, tokenizer = load_smollm2()
    return model, HfTokenizer(tokenizer), f"SmolLM2-135M-Instruct ({smollm2_gguf_path().name}, dequantised to fp32)"


# ----------------------------------------------------------------------------------------------------------------
# Data


def _relative(path: Path) -> str:
    try:
        return path.relative_to(PYTHON_DOC_SOURCES).as_posix()
    except ValueError:
        return path.name


def split_blocks(tokenizer, settings: dict, files: list[Path] | None = None) -> dict:
    """Evaluation blocks, calibration ids and healing batches, split by file (see the module docstring)."""
    files = list(python_doc_files() if files is None else files)
    random.Random(settings["seed"]).shuffle(files)
    size = settings["block_size"]
    eval_needed = settings["eval_blocks"]
    train_needed = settings["calibration_blocks"] + settings["heal_steps"] * settings["heal_batch_size"]
    eval_blocks, train_blocks, eval_files, train_files = [], [], [], []
    for path in files:
        to_eval = len(eval_blocks) < eval_needed
        if not to_eval and len(train_blocks) >= train_needed:
            break
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        limit = settings["max_eval_blocks_per_file" if to_eval else "max_train_blocks_per_file"]
        blocks = [ids[start:start + size] for start in range(0, len(ids) - size + 1, size)][:limit]
        if not blocks:
            continue
        (eval_blocks if to_eval else train_blocks).extend(blocks)
        (eval_files if to_eval else train_files).append(_relative(path))
    if len(eval_blocks) < eval_needed or len(train_blocks) < train_needed:
        raise ValueError(f"not enough text: {len(eval_blocks)}/{eval_needed} evaluation and {len(train_blocks)}/"
                         f"{train_needed} training blocks of {size} tokens")
    eval_ids = torch.tensor(eval_blocks[:eval_needed], dtype=torch.long)
    train_ids = torch.tensor(train_blocks[:train_needed], dtype=torch.long)
    calibration = train_ids[:settings["calibration_blocks"]]
    heal_batches = list(train_ids[settings["calibration_blocks"]:].split(settings["heal_batch_size"]))
    digest = hashlib.sha256(train_ids.numpy().tobytes()).hexdigest()[:16]
    return {
        "eval_batches": list(eval_ids.split(settings["eval_batch_size"])),
        "calibration_input_ids": calibration,
        "heal_batches": heal_batches,
        "eval_files": eval_files,
        "train_files": train_files,
        "report": {
            "source": "Python 3.11 documentation sources (python_doc_files), reStructuredText as is, split by file",
            "tokenizer": tokenizer.name, "block_size": size,
            "eval_blocks": eval_needed, "eval_tokens_scored": eval_needed * (size - 1),
            "eval_files": len(eval_files), "train_files": len(train_files),
            "calibration_shape": list(calibration.shape), "heal_batches": len(heal_batches),
            "heal_tokens": len(heal_batches) * settings["heal_batch_size"] * size,
            "train_digest": digest,
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], reference=None) -> dict:
    """Token-weighted mean next-token cross-entropy (nats) and perplexity of ``model`` over ``batches``.

    With ``reference`` (another model), also its loss on the same batches and the max |Δlogit| between the two.
    """
    model.eval()
    total = reference_total = 0.0
    count = 0
    max_diff = 0.0
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits
        targets = ids[:, 1:].reshape(-1)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                                 reduction="sum").item()
        count += targets.numel()
        if reference is not None:
            reference_logits = reference(input_ids=ids, use_cache=False).logits
            max_diff = max(max_diff, (logits - reference_logits).abs().max().item())
            reference_total += F.cross_entropy(reference_logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               targets, reduction="sum").item()
        del logits
    nll = total / count
    record = {"nll": nll, "ppl": math.exp(nll), "tokens": count}
    if reference is not None:
        reference_nll = reference_total / count
        record.update({"reference_nll": reference_nll, "reference_ppl": math.exp(reference_nll),
                       "max_abs_logit_diff": max_diff})
    return record


def trainable_parameters(model, which: str) -> list[torch.nn.Parameter]:
    """Freeze ``model`` except ``which``: "attention" (every ``.self_attn.`` parameter) or "all"."""
    if which not in ("attention", "all"):
        raise ValueError(f"heal_parameters must be 'attention' or 'all', got {which!r}")
    selected = []
    for name, parameter in model.named_parameters():
        train = which == "all" or ".self_attn." in name
        parameter.requires_grad_(train)
        if train:
            selected.append(parameter)
    return selected


def heal(model, batches: list[torch.Tensor], settings: dict) -> dict:
    """Fine-tune ``model`` in place with Lion on ``batches`` (see the module docstring); returns the run's record."""
    parameters = trainable_parameters(model, settings["heal_parameters"])
    optimizer = Lion(parameters, lr=settings["learning_rate"], betas=tuple(settings["betas"]),
                     weight_decay=settings["weight_decay"])
    model.train()
    losses, started = [], time.perf_counter()
    warmup = max(1, settings["warmup_steps"])
    for step, ids in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = settings["learning_rate"] * min(1.0, (step + 1) / warmup)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return {"train_loss": losses, "steps": len(batches), "seconds": seconds,
            "seconds_per_step": seconds / max(1, len(batches)),
            "trainable_parameters": sum(p.numel() for p in parameters),
            "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "finite": all(math.isfinite(x) for x in losses)}


def cache_sizes(config, gqa_bytes_fp32: int) -> dict:
    """KV bytes per token (fp32, bf16) of ``config`` and its fraction of the GQA cache."""
    fp32 = hf_ext.kv_cache_bytes_per_token(config, dtype=torch.float32)
    bf16 = hf_ext.kv_cache_bytes_per_token(config, dtype=torch.bfloat16)
    return {"kv_bytes_per_token_fp32": fp32, "kv_bytes_per_token_bf16": bf16,
            "kv_elements_per_token_per_layer": fp32 // 4 // config.num_hidden_layers,
            "fraction_of_gqa": fp32 / gqa_bytes_fp32}


def _setting_name(rope: int, rank: int) -> str:
    return f"rope {rope} / rank {rank}"


# ----------------------------------------------------------------------------------------------------------------
# Reporting


def _ppl_metric(description: str, candidate: float, peer: float) -> dict:
    return {
        "description": description,
        "unit": "PPL",
        "candidate": candidate,
        "peer": peer,
        # RESULTS.md renders this field as the ratio column; here it is a perplexity ratio, not a speed.
        "speed_ratio": peer / candidate,
        "ratio_definition": "peer PPL / candidate PPL; > 1 means the MLA model is better",
        "goal": None,
        "min_speed_ratio": None,
        "passed": None,
    }


def make_metrics(reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None) -> dict:
    metrics = {"exact conversion vs original": _ppl_metric(
        "held-out perplexity of the exact conversion (qk_rope_head_dim = head_dim, kv_lora_rank = n_kv·head_dim) "
        "against the original", reference["exact"]["ppl"], reference["original"]["ppl"])}
    for row in ladder:
        name, share = _setting_name(row["qk_rope_head_dim"], row["kv_lora_rank"]), row["fraction_of_gqa"] * 100
        metrics[f"training-free calibrated {name} ({share:.0f}% cache) vs original"] = _ppl_metric(
            f"held-out perplexity, calibrated conversion without training, {share:.1f} % of the GQA cache, against "
            "the original GQA model", row["calibrated"]["ppl"], reference["original"]["ppl"])
    for row in ladder:
        if row.get("healed") and fine_tuned_gqa:
            name, share = _setting_name(row["qk_rope_head_dim"], row["kv_lora_rank"]), row["fraction_of_gqa"] * 100
            metrics[f"healed {name} ({share:.0f}% cache) vs equally fine-tuned GQA"] = _ppl_metric(
                f"held-out perplexity after the healing fine-tune, {share:.1f} % of the GQA cache, against the "
                "original GQA model given the identical fine-tune", row["healed"]["ppl"], fine_tuned_gqa["ppl"])
    return metrics


def _ppl(value) -> str:
    if value is None:
        return "—"
    return f"{value:,.1f}" if value >= 1000 else f"{value:.3f}" if value < 100 else f"{value:.2f}"


def markdown_tables(reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None, settings: dict) -> list[str]:
    heal_note = (f"healed = calibrated conversion + {settings['heal_steps']} Lion steps of "
                 f"{settings['heal_batch_size']}×{settings['block_size']} tokens ({settings['heal_parameters']} "
                 f"parameters, lr {settings['learning_rate']:g})")
    rows = [f"Held-out perplexity ({settings['eval_blocks']} blocks of {settings['block_size']} tokens from held-out "
            f"Python documentation files) vs KV cache per token; {heal_note}. Fine-tuned GQA: the original given the "
            "identical fine-tune (the fair reference for healed rows).", "",
            "| model / setting (qk_rope_head_dim, kv_lora_rank) | KV elements / token / layer | KV bytes / token fp32 "
            "| bf16 | % of GQA | PPL training-free, plain SVD | PPL training-free, calibrated | PPL healed |",
            "|---|---|---|---|---|---|---|---|"]
    original, exact = reference["original"], reference["exact"]
    rows.append(f"| original GQA | {original['kv_elements_per_token_per_layer']} | "
                f"{original['kv_bytes_per_token_fp32']:,} | {original['kv_bytes_per_token_bf16']:,} | 100 % | "
                f"{_ppl(original['ppl'])} (original) | — | "
                f"{_ppl(fine_tuned_gqa['ppl']) + ' (fine-tuned GQA)' if fine_tuned_gqa else '—'} |")
    rows.append(f"| exact MLA ({exact['qk_rope_head_dim']}, {exact['kv_lora_rank']}) | "
                f"{exact['kv_elements_per_token_per_layer']} | {exact['kv_bytes_per_token_fp32']:,} | "
                f"{exact['kv_bytes_per_token_bf16']:,} | {exact['fraction_of_gqa'] * 100:.1f} % | "
                f"{_ppl(exact['ppl'])} | — | — |")
    for row in ladder:
        rows.append(f"| MLA ({row['qk_rope_head_dim']}, {row['kv_lora_rank']}) | "
                    f"{row['kv_elements_per_token_per_layer']} | {row['kv_bytes_per_token_fp32']:,} | "
                    f"{row['kv_bytes_per_token_bf16']:,} | {row['fraction_of_gqa'] * 100:.1f} % | "
                    f"{_ppl(row['plain']['ppl'])} | {_ppl(row['calibrated']['ppl'])} | "
                    f"{_ppl(row['healed']['ppl']) if row.get('healed') else '—'} |")
    published = ["Published numbers for other (7-8 B) models, as context only (other data, protocols and compression "
                 "rates; values as quoted in the issue, not re-measured):", "",
                 "| source | model | metric | original | converted, training-free | after fine-tuning | KV cache "
                 "| note |",
                 "|---|---|---|---|---|---|---|---|"]
    for entry in PUBLISHED:
        cells = [entry["source"], entry["model"], entry["metric"],
                 "—" if entry["original"] is None else f"{entry['original']:g}",
                 "—" if entry["converted_training_free"] is None else f"{entry['converted_training_free']:g}",
                 f"{entry['converted_fine_tuned']:g}" if entry.get("converted_fine_tuned") is not None else "—",
                 entry["kv_cache_reduction"], entry["note"] or "—"]
        published.append("| " + " | ".join(cells) + " |")
    return ["\n".join(rows), "\n".join(published)]


def plot(path: Path, reference: dict, ladder: list[dict], fine_tuned_gqa: dict | None, healing: dict,
         title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    kib = lambda row: row["kv_bytes_per_token_fp32"] / 1024  # noqa: E731
    rows = sorted(ladder, key=kib)
    xs = [kib(r) for r in rows]
    left.plot(xs, [r["plain"]["ppl"] for r in rows], marker="x", linestyle="--", color="tab:red",
              label="MLA training-free, plain SVD")
    left.plot(xs, [r["calibrated"]["ppl"] for r in rows], marker="o", color="tab:blue",
              label="MLA training-free, calibrated")
    healed = [r for r in rows if r.get("healed")]
    if healed:
        left.plot([kib(r) for r in healed], [r["healed"]["ppl"] for r in healed], marker="*", markersize=12,
                  linestyle="none", color="tab:green", label="MLA calibrated + healing fine-tune")
    original = reference["original"]
    left.plot([kib(original)], [original["ppl"]], marker="s", markersize=9, color="black", linestyle="none",
              label="original GQA")
    left.plot([kib(reference["exact"])], [reference["exact"]["ppl"]], marker="s", markersize=14, color="black",
              fillstyle="none", linestyle="none", label="exact MLA conversion")
    left.axhline(original["ppl"], color="black", linewidth=0.8, linestyle=":")
    if fine_tuned_gqa:
        left.plot([kib(original)], [fine_tuned_gqa["ppl"]], marker="D", markersize=8, color="tab:green",
                  linestyle="none", label="GQA, identical fine-tune")
        left.axhline(fine_tuned_gqa["ppl"], color="tab:green", linewidth=0.8, linestyle=":")
    for r in rows:
        left.annotate(f"({r['qk_rope_head_dim']},{r['kv_lora_rank']})", (kib(r), r["calibrated"]["ppl"]),
                      textcoords="offset points", xytext=(4, 6), fontsize=8)
    left.set_yscale("log")
    left.set_xlabel("KV cache per token, fp32 (KiB); labels: (qk_rope_head_dim, kv_lora_rank)")
    left.set_ylabel("held-out perplexity (log scale)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    top = left.secondary_xaxis("top", functions=(lambda x: x / kib(original) * 100,
                                                 lambda p: p * kib(original) / 100))
    top.set_xlabel("% of the GQA cache")
    for name, run in healing.items():
        right.plot(range(1, len(run["train_loss"]) + 1), run["train_loss"], label=name)
    right.set_xlabel("healing step")
    right.set_ylabel("training loss (nats)")
    right.set_title("healing fine-tune", fontsize=10)
    right.grid(True, alpha=0.3)
    if healing:
        right.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def run(settings: dict, *, quick: bool = False, benchmarks_dir: Path = BENCH_DIR) -> dict:
    """Every measurement of the module docstring; the result document, saved under ``benchmarks_dir/results``."""
    started = time.perf_counter()
    settings = copy.deepcopy(settings)
    heal_set = {tuple(pair) for pair in settings["heal"]}
    unknown = heal_set - {tuple(pair) for pair in settings["ladder"]}
    if unknown:
        raise ValueError(f"heal settings {sorted(unknown)} are not on the ladder {settings['ladder']}")
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # see the module docstring
    threads = configure_threads()
    torch.manual_seed(settings["seed"])
    sections = {}

    section = time.perf_counter()
    original, tokenizer, model_description = load_model(settings)
    for parameter in original.parameters():
        parameter.requires_grad_(False)
    sections["load"] = time.perf_counter() - section
    section = time.perf_counter()
    data = split_blocks(tokenizer, settings)
    sections["data"] = time.perf_counter() - section
    config = original.config
    settings.update({"model_description": model_description, "dtype": "float32", "device": "cpu",
                     "threads": threads, "data": data["report"],
                     "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                     "num_key_value_heads": config.num_key_value_heads, "num_hidden_layers": config.num_hidden_layers,
                     "optimizer": f"hf_ext.optim.Lion, betas {tuple(settings['betas'])}, linear warm-up over "
                                  f"{settings['warmup_steps']} steps then constant, no gradient clipping"})
    _log(f"{model_description}; {threads} threads; data {data['report']} ({sections['data']:.0f} s)")
    gqa_bytes = hf_ext.kv_cache_bytes_per_token(config, dtype=torch.float32)

    # 1. The original and the exact conversion, on the same batches.
    section = time.perf_counter()
    exact_model = hf_ext.convert.to_mla(original)
    joint = evaluate(exact_model, data["eval_batches"], reference=original)
    reference = {
        "original": {"ppl": joint["reference_ppl"], "nll": joint["reference_nll"], "tokens": joint["tokens"],
                     **cache_sizes(config, gqa_bytes)},
        "exact": {"ppl": joint["ppl"], "nll": joint["nll"], "tokens": joint["tokens"],
                  "max_abs_logit_diff": joint["max_abs_logit_diff"],
                  "qk_rope_head_dim": exact_model.config.qk_rope_head_dim,
                  "kv_lora_rank": exact_model.config.kv_lora_rank, **cache_sizes(exact_model.config, gqa_bytes)},
    }
    del exact_model
    sections["original_and_exact"] = time.perf_counter() - section
    _log(f"original PPL {reference['original']['ppl']:.4f}; exact MLA PPL {reference['exact']['ppl']:.4f}, "
         f"max |Δlogit| {joint['max_abs_logit_diff']:.2e} ({sections['original_and_exact']:.0f} s)")

    # 2. The ladder: plain and calibrated conversions; healing of the calibrated ones listed in `heal`.
    ladder, healing = [], {}
    for rope, rank in settings["ladder"]:
        section = time.perf_counter()
        row = {"qk_rope_head_dim": rope, "kv_lora_rank": rank}
        for variant, calibration in (("plain", None), ("calibrated", data["calibration_input_ids"])):
            convert_start = time.perf_counter()
            model = hf_ext.convert.to_mla(original, kv_lora_rank=rank, qk_rope_head_dim=rope,
                                          calibration_input_ids=calibration)
            convert_seconds = time.perf_counter() - convert_start
            row.update(cache_sizes(model.config, gqa_bytes))
            row[variant] = {**evaluate(model, data["eval_batches"]), "convert_seconds": convert_seconds}
            if variant == "calibrated" and (rope, rank) in heal_set:
                run_record = heal(model, data["heal_batches"], settings)
                row["healed"] = evaluate(model, data["eval_batches"])
                row["healed_kv_bytes_per_token_fp32"] = hf_ext.kv_cache_bytes_per_token(model.config,
                                                                                        dtype=torch.float32)
                healing[f"MLA {_setting_name(rope, rank)}"] = run_record
            del model
        ladder.append(row)
        sections[_setting_name(rope, rank)] = time.perf_counter() - section
        healed = ""
        if row.get("healed"):
            per_step = healing[f"MLA {_setting_name(rope, rank)}"]["seconds_per_step"]
            healed = f", healed {row['healed']['ppl']:.3f} ({per_step:.1f} s/step)"
        _log(f"{_setting_name(rope, rank):<18} {row['kv_bytes_per_token_fp32']:>7,} B/token fp32 "
             f"({row['fraction_of_gqa'] * 100:5.1f} % of GQA): PPL plain {row['plain']['ppl']:.3f}, calibrated "
             f"{row['calibrated']['ppl']:.3f}{healed} ({sections[_setting_name(rope, rank)]:.0f} s)")

    # 3. The honesty control: the original with the identical fine-tune.
    fine_tuned_gqa = None
    if heal_set:
        section = time.perf_counter()
        control = copy.deepcopy(original)
        healing["GQA original"] = heal(control, data["heal_batches"], settings)
        fine_tuned_gqa = evaluate(control, data["eval_batches"])
        del control
        sections["fine_tuned_gqa"] = time.perf_counter() - section
        _log(f"GQA with the identical fine-tune: PPL {fine_tuned_gqa['ppl']:.4f} ({sections['fine_tuned_gqa']:.0f} s)")

    # Checks.
    tolerance = settings["exact_tolerance"]
    exact_ok = joint["max_abs_logit_diff"] <= tolerance and abs(joint["nll"] - joint["reference_nll"]) <= 1e-5
    all_ppl = [reference["original"]["ppl"], reference["exact"]["ppl"]] + [
        row[v]["ppl"] for row in ladder for v in ("plain", "calibrated", "healed") if row.get(v)] + (
        [fine_tuned_gqa["ppl"]] if fine_tuned_gqa else [])
    layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    checks = {
        "exact_conversion": {
            "max_abs_logit_diff": joint["max_abs_logit_diff"], "tolerance": tolerance,
            "nll_abs_diff": abs(joint["nll"] - joint["reference_nll"]),
            "ppl_original": reference["original"]["ppl"], "ppl_exact": reference["exact"]["ppl"],
            "same_kv_bytes": reference["exact"]["kv_bytes_per_token_fp32"] == gqa_bytes,
            "passed": bool(exact_ok),
        },
        # kv_lora_rank + n_kv · qk_rope_head_dim elements per token and layer, 4 bytes each in fp32
        "kv_bytes_formula": all(row["kv_bytes_per_token_fp32"] == 4 * layers * (row["kv_lora_rank"] + n_kv *
                                                                                row["qk_rope_head_dim"])
                                for row in ladder),
        "healing_keeps_cache": all(row["healed_kv_bytes_per_token_fp32"] == row["kv_bytes_per_token_fp32"]
                                   for row in ladder if row.get("healed")),
        "split_by_file": not set(data["eval_files"]) & set(data["train_files"]),
        "same_healing_batches": {"digest": data["report"]["train_digest"], "runs": sorted(healing)},
        "all_finite": all(math.isfinite(p) for p in all_ppl) and all(r["finite"] for r in healing.values()),
    }
    if not exact_ok:
        _log(f"WARNING: the exact conversion is not exact: {checks['exact_conversion']}")

    # Report.
    _log(f"\n{'setting':<20}{'B/token fp32':>13}{'% GQA':>8}{'PPL plain':>12}{'calibrated':>12}{'healed':>10}")
    _log(f"{'original GQA':<20}{gqa_bytes:>13,}{100:>8.1f}{reference['original']['ppl']:>12.3f}{'':>12}"
         + (f"{fine_tuned_gqa['ppl']:>10.3f}" if fine_tuned_gqa else f"{'—':>10}"))
    for row in ladder:
        _log(f"{_setting_name(row['qk_rope_head_dim'], row['kv_lora_rank']):<20}"
             f"{row['kv_bytes_per_token_fp32']:>13,}{row['fraction_of_gqa'] * 100:>8.1f}"
             f"{row['plain']['ppl']:>12.3f}{row['calibrated']['ppl']:>12.3f}"
             + (f"{row['healed']['ppl']:>10.3f}" if row.get("healed") else f"{'—':>10}"))

    result = make_result(NAME, candidate=CANDIDATE, peer=PEER, settings=settings,
                         metrics=make_metrics(reference, ladder, fine_tuned_gqa), checks=checks, quick=quick)
    sections["total"] = time.perf_counter() - started
    result["tables"] = {
        "units": "perplexity = exp(token-weighted mean next-token cross-entropy in nats) on the held-out blocks; "
                 "KV bytes per token summed over layers",
        "reference": reference,
        "ladder": ladder,
        "fine_tuned_gqa": fine_tuned_gqa,
        "healing": healing,
        "published": PUBLISHED,
        "eval_files": data["eval_files"],
        "sections_seconds": sections,
    }
    result["markdown_tables"] = markdown_tables(reference, ladder, fine_tuned_gqa, settings)
    results_dir = Path(benchmarks_dir) / "results" / ("quick" if quick else "")
    picture = plot(results_dir / f"{NAME}.png", reference, ladder, fine_tuned_gqa, healing,
                   f"{'SmolLM2-135M' if settings['model'] == 'smollm2-135m' else settings['model']} → MLA: held-out "
                   f"perplexity vs KV cache ({settings['eval_blocks']}×{settings['block_size']} tokens of held-out "
                   "Python docs)")
    result["plots"] = [str(picture.relative_to(benchmarks_dir))] if picture and not quick else []
    result["plot_file"] = str(picture) if picture else None
    result["total_seconds"] = time.perf_counter() - started
    path = save_result(result, benchmarks_dir)
    _log(f"results in {path} ({result['total_seconds']:.0f} s in all)")
    return result


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``heal_steps=100``)."""
    return run(benchmark_settings(FULL, QUICK, quick, overrides), quick=quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
