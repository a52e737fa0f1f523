"""Training machinery of the `ropetie_digit_canvas` benchmark: the tiny HfExt image-text model of one position layout,
its learning-rate schedule and AdamW loop, and running groups of layouts in parallel worker processes.

A worker is this module run as ``python -m benchmarks.tasks.ropetie_training ARGUMENTS_JSON OUTPUT_JSON``
(`run_in_processes` starts them).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_ext import HfExtConfig, HfExtForCausalLM

from ..harness import log
from .digit_canvas import model_inputs


def build_model(layout: str, settings: dict, processor, seed: int) -> HfExtForCausalLM:
    """An HfExt image-text model of ``settings["model"]`` with one `position_layout`, fp32, sdpa, seeded."""
    tokenizer = processor.tokenizer
    config = HfExtConfig(**settings["model"], position_layout=layout, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **processor.model_config_kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # the same seed gives every layout the same initial weights (the layouts add none)
    return HfExtForCausalLM(config)


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every tensor of the state dict (equal initial weights give equal digests)."""
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
            log(f"  {label} step {step + 1}/{len(batches)}: loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_seconds": seconds, "seconds_per_step": seconds / max(1, len(batches)), "train_loss": losses,
            "final_train_loss": sum(tail) / len(tail), "finite": all(math.isfinite(x) for x in losses)}


def run_in_processes(target: str, calls: list[dict], threads: int) -> list:
    """``target(**call)`` for every call, all at once, each in its own Python process with ``threads`` torch
    threads; ``target`` names a function as ``"package.module:function"``. Returns the results (through JSON)."""
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the benchmarks package
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as directory:
        processes, outputs = [], []
        for index, call in enumerate(calls):
            arguments, output = Path(directory) / f"arguments{index}.json", Path(directory) / f"output{index}.json"
            arguments.write_text(json.dumps({"target": target, "call": call, "threads": threads}))
            outputs.append(output)
            processes.append(subprocess.Popen([sys.executable, "-m", __name__, str(arguments), str(output)],
                                              env=environment))
        codes = [process.wait() for process in processes]
        if any(codes):
            raise RuntimeError(f"worker processes failed with exit codes {codes}")
        return [json.loads(output.read_text()) for output in outputs]


def _worker(arguments_path: str, output_path: str) -> None:
    """Entry point of a worker process (see `run_in_processes`)."""
    arguments = json.loads(Path(arguments_path).read_text())
    torch.set_num_threads(arguments["threads"])
    module, function = arguments["target"].split(":")
    result = getattr(importlib.import_module(module), function)(**arguments["call"])
    Path(output_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
