"""The GQA → MLA conversion benchmark's task: SmolLM2-135M (or a tiny random Llama over bytes), held-out Python
documentation split by file into evaluation, calibration and healing blocks, perplexity on the held-out blocks, and
the short Lion fine-tune ("healing") given alike to the converted models and to the GQA control."""

import hashlib
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hf_ext
from hf_ext.optim import Lion

from .assets import PYTHON_DOC_SOURCES, python_doc_files
from .finetuning_data import ByteTokenizer, HfTokenizer  # the tokenizers `lora_finetuning` uses too

# A tiny random Llama (head_dim 16, 2 KV heads: a GQA cache of 64 elements per token and layer) over bytes of the
# same real text: every code path in seconds.
TINY_MODEL = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_llama(seed: int = 0):
    """The quick mode's random `LlamaForCausalLM` of ``TINY_MODEL`` (sdpa), drawn after ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_MODEL)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def load_model(name: str, seed: int = 0):
    """(model in eval mode, tokenizer, description) for ``name``: "smollm2-135m" or "tiny-llama"."""
    if name == "tiny-llama":
        return tiny_llama(seed), ByteTokenizer(), "tiny random LlamaForCausalLM " + str(TINY_MODEL)
    if name != "smollm2-135m":
        raise ValueError(f"unknown model {name!r}; known: 'smollm2-135m', 'tiny-llama'")
    from .assets import load_smollm2, smollm2_gguf_path

    model, tokenizer = load_smollm2()
    return model, HfTokenizer(tokenizer), f"SmolLM2-135M-Instruct ({smollm2_gguf_path().name}, dequantised to fp32)"


def _relative(path: Path) -> str:
    try:
        return path.relative_to(PYTHON_DOC_SOURCES).as_posix()
    except ValueError:
        return path.name


def split_blocks(tokenizer, settings: dict, files: list[Path] | None = None) -> dict:
    """Evaluation blocks, calibration ids and healing batches of ``block_size`` tokens, split by file.

    The files (default: the Python documentation) are shuffled with ``seed``; the first ones fill the evaluation set
    (at most ``max_eval_blocks_per_file`` consecutive blocks per file, so that it spans many files), the following
    files the training split (at most ``max_train_blocks_per_file`` blocks per file): first the calibration blocks,
    then the healing batches. No file contributes to both splits.
    """
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
    """Fine-tune ``model`` in place with Lion on ``batches``: the ``heal_parameters``, linear warm-up over
    ``warmup_steps`` to ``learning_rate``, then constant, no gradient clipping. Returns the run's record."""
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
