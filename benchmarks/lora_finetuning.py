"""Fine-tuning SmolLM2-135M with seven LoRA-type methods at the same rank: loss curves, steps to a fixed eval loss,
memory.

Methods (`tasks/lora_methods.py`): PEFT's LoRA, PiSSA and LoRA-GA, hf_ext's LoRA-GA (`get_lora_ga_model`) and the
three gradient-view LoRA modes; rank 8, alpha 16, the seven linear layers of every decoder layer, each from a fresh
copy of the model, the same batches in the same order, AdamW at the same constant learning rate. Tasks
(`tasks/finetuning_data.py`): ``text`` (token blocks of the Python documentation) and ``instruction`` (glossary
definitions and section summaries, loss on the answers), both split by file into training and held-out evaluation.

Per task and method: the training loss of every step; the eval loss (token-weighted mean cross-entropy in nats over
the held-out examples) every ``eval_every`` steps; the initialisation's seconds and peak RSS growth; the peak RSS
growth over the training steps (evaluations excluded) and the seconds per step. The threshold of a task is LoRA's
final eval loss; goal: steps(LoRA) / steps(hf_ext LoRA-GA) to reach it >= 2 (``nan``: not reached within ``steps``).
``checks.init_logits_max_abs_diff``: every initialisation must keep the model's logits (≲ 1e-4 in fp32).

Run with ``python -m benchmarks.lora_finetuning`` (about 30 minutes on 2 cores) or ``--quick`` (every method and
task for 4 steps on a tiny random Llama over bytes of the same text: seconds, a smoke test, not a measurement).
"""

import copy
import math
import time

import torch

from hf_ext.peft.gradient_sketch import gradient_passes

from .harness import (configure_threads, fix_mmap_threshold, log, main, make_result, memory_ratio, peak_memory_growth,
                      release_free_memory, reset_high_water_mark, save_result, status_kib)
from .tasks.assets import load_smollm2, smollm2_gguf_path
from .tasks.finetuning_data import IGNORE_INDEX, TASKS, ByteTokenizer, HfTokenizer, Task, build_tasks, tiny_llama
from .tasks.lora_methods import GV_MODES, METHODS, initialise, make_optimizer, trained_parameter_count
from .tasks.lora_reports import finetuning_plot, finetuning_table, mib_text

NAME = "lora_finetuning"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FULL = {
    "model": "smollm2-135m", "tasks": list(TASKS), "methods": list(METHODS),
    "rank": 8, "lora_alpha": 16, "target_modules": TARGET_MODULES,
    "learning_rate": 2e-4,  # the same for every method (LoRA-GA's paper: LoRA-GA likes a lower one)
    "weight_decay": 0.0, "steps": 20, "batch_size": 4,
    "block_size": 128,  # text blocks; the longest instruction example
    "eval_examples": 24, "eval_every": 5, "eval_batch_size": 8, "max_blocks_per_file": 8, "max_sections_per_file": 4,
    "gradient_batches": 4,  # LoRA-GA: the first training batches
    "direction": "ArB2r", "scale": "stable", "stable_gamma": 16,
    "power_iterations": 2,  # hf_ext LoRA-GA (its default is 4): 2 + 2·2 = 6 passes over the gradient batches
    "pissa_init": "pissa_niter_4",
    "resample_every": 5,  # gradient-view mode "resample"
    "goal_step_ratio": 2.0, "seed": 0,
}
# A tiny random Llama over bytes of the same real text: every code path in seconds (a smoke test, not a measurement).
TINY_MODEL = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
QUICK = {**FULL, "model": "tiny-llama", "steps": 4, "batch_size": 2, "block_size": 256, "eval_examples": 4,
         "eval_every": 2, "eval_batch_size": 4, "max_blocks_per_file": 2, "max_sections_per_file": 2,
         "gradient_batches": 2, "power_iterations": 1, "resample_every": 2}


class TrainingPeak:
    """Peak RSS growth above the RSS at `start`, over the stretches outside `pause`…`resume` (the evaluations):
    the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs (Linux; elsewhere `stop` gives None)."""

    def __init__(self):
        self.supported = reset_high_water_mark()
        self.baseline = self.peak = 0

    def start(self) -> None:
        if self.supported:
            release_free_memory()
            self.baseline = self.peak = status_kib("VmRSS")
            reset_high_water_mark()

    def pause(self) -> None:
        if self.supported:
            self.peak = max(self.peak, status_kib("VmHWM"))

    def resume(self) -> None:
        if self.supported:
            reset_high_water_mark()

    def stop(self) -> int | None:
        if not self.supported:
            return None
        self.pause()
        return max(0, self.peak - self.baseline) * 1024


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

    ``initial_eval_loss`` (the reference model's) is the step-0 point of every curve: every initialisation keeps the
    model's function, which ``init_logits_max_abs_diff`` checks on one held-out example.
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
        "method": method, "label": METHODS[method], "optimizer_class": optimizer_class, "trained_parameters": trained,
        "init_seconds": init_seconds, "init_peak_bytes": init_peak, "init_peak_mib": init_peak / 2**20,
        "init_logits_max_abs_diff": logits_difference, "train_peak_bytes": train_peak,
        "train_peak_mib": None if train_peak is None else train_peak / 2**20, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / steps, "train_loss": train_losses, "eval_curve": curve,
        "initial_eval_loss": curve[0], "final_eval_loss": curve[steps],
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


def task_metrics(task: str, runs: dict[str, dict], summary: dict, settings: dict) -> dict:
    """RESULTS.md rows of one task: the steps goal and two informational comparisons."""
    metrics, goal, none = {}, settings["goal_step_ratio"], float("nan")
    informational = {"goal": None, "min_speed_ratio": None, "passed": None}
    if "lora" in runs and "hf_ext_lora_ga" in runs:
        ratio, ours_steps = summary["step_ratio"], runs["hf_ext_lora_ga"]["steps_to_threshold"]
        lora_steps = runs["lora"]["steps_to_threshold"]
        metrics[f"{task}: steps to LoRA's final eval loss, hf_ext LoRA-GA vs LoRA"] = {
            "description": f"{task} task: training steps until the eval loss first reaches LoRA's final eval loss "
                           f"({summary['threshold']:.4f} nats; evaluated every {settings['eval_every']} steps, "
                           f"{settings['steps']} steps in all); nan: not reached",
            "unit": "steps", "candidate": none if ours_steps is None else ours_steps,
            "peer": none if lora_steps is None else lora_steps, "speed_ratio": ratio,
            "ratio_definition": "LoRA steps / hf_ext LoRA-GA steps; > 1 means LoRA-GA needs fewer",
            "goal": f"step ratio >= {goal}", "min_step_ratio": goal, "min_speed_ratio": None,
            # None: undefined (see step_ratio)
            "passed": None if ratio is None and ours_steps is not None else bool(ratio is not None and ratio >= goal),
        }
        final, reference = runs["hf_ext_lora_ga"]["final_eval_loss"], runs["lora"]["final_eval_loss"]
        metrics[f"{task}: final eval loss, hf_ext LoRA-GA vs LoRA"] = {
            "description": f"{task} task: eval loss after {settings['steps']} steps",
            "unit": "nats", "candidate": final, "peer": reference,
            "speed_ratio": reference / final if final > 0 and math.isfinite(final) else None,
            "ratio_definition": "LoRA loss / hf_ext LoRA-GA loss; > 1 means LoRA-GA is lower", **informational,
        }
    if "peft_lora_ga" in runs and "hf_ext_lora_ga" in runs:
        ours, theirs = runs["hf_ext_lora_ga"]["init_peak_bytes"], runs["peft_lora_ga"]["init_peak_bytes"]
        metrics[f"{task}: LoRA-GA init peak memory, hf_ext vs PEFT"] = {
            "description": f"{task} task: peak RSS growth of the LoRA-GA initialisation "
                           f"({settings['gradient_batches']} batches of {settings['batch_size']}; hf_ext: "
                           f"{gradient_passes(settings['power_iterations'])} gradient passes, PEFT: 1); informational "
                           "(the lora_ga_init_memory benchmark holds the memory goal)",
            "unit": "MiB", "candidate": ours / 2**20, "peer": theirs / 2**20,
            "candidate_peak_bytes": ours, "peer_peak_bytes": theirs,
            "memory_ratio": memory_ratio(ours, theirs), "speed_ratio": memory_ratio(ours, theirs),
            "ratio_definition": "PEFT peak / hf_ext peak; > 1 means hf_ext needs less memory", **informational,
        }
    return metrics


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    settings = copy.deepcopy(settings)
    unknown_methods, unknown_tasks = set(settings["methods"]) - set(METHODS), set(settings["tasks"]) - set(TASKS)
    if unknown_methods or unknown_tasks:
        raise ValueError(f"unknown methods {sorted(unknown_methods)} / tasks {sorted(unknown_tasks)}; known: "
                         f"{list(METHODS)} / {list(TASKS)}")
    threads = configure_threads()
    fix_mmap_threshold()  # freed large blocks go back to the OS, so that RSS follows the live tensors
    sections, section_start = {}, time.perf_counter()
    if settings["model"] == "tiny-llama":
        reference, tokenizer = tiny_llama(TINY_MODEL, settings["seed"]), ByteTokenizer()
        settings["model_config"] = TINY_MODEL
    else:
        reference, hf_tokenizer = load_smollm2()
        tokenizer, settings["model_file"] = HfTokenizer(hf_tokenizer), smollm2_gguf_path().name
    for parameter in reference.parameters():
        parameter.requires_grad_(False)  # every method trains adapters only (PEFT freezes the base model as well)
    sections["load"], section_start = time.perf_counter() - section_start, time.perf_counter()
    tasks = build_tasks(tokenizer, settings)
    sections["data"] = time.perf_counter() - section_start
    settings.update({
        "dtype": "float32", "device": "cpu", "threads": threads, "tokenizer": tokenizer.name,
        "parameters": sum(p.numel() for p in reference.parameters()),
        "optimizer": "torch.optim.AdamW (gradient view: on its rank-r factors), betas (0.9, 0.999), constant lr, "
                     "no warm-up, no gradient clipping",
        "eval_steps": eval_steps(settings),
        "hf_ext_lora_ga_gradient_passes": gradient_passes(settings["power_iterations"]),
        "peft_lora_ga_gradient_passes": 1, "gradient_batches_source": "the first training batches of the task",
        "data": {name: task.report for name, task in tasks.items()},
    })
    log(f"{settings['model']}: {settings['parameters']:,} parameters, {threads} threads; "
        + "; ".join(f"{name}: {len(task.train_batches)} training batches, {len(task.eval_batches)} eval batches"
                    for name, task in tasks.items()))

    # Every method's code path once on a tiny model: first-call costs stay outside the measurements.
    section_start = time.perf_counter()
    tiny, generator = tiny_llama(TINY_MODEL, seed=123), torch.Generator().manual_seed(123)
    ids = torch.randint(3, TINY_MODEL["vocab_size"], (2, 16), generator=generator)
    warm = Task("warm-up", [{"input_ids": ids, "labels": ids.clone()}], [{"input_ids": ids, "labels": ids.clone()}])
    for method in settings["methods"]:
        run_method(method, tiny, warm, {**settings, "gradient_batches": 1, "power_iterations": 1, "steps": 1,
                                        "eval_every": 1}, eval_loss(tiny, warm.eval_batches))
    sections["warm_up"] = time.perf_counter() - section_start

    results, metrics, tables, checks = {}, {}, [], {}
    for name, task in tasks.items():
        section_start, runs = time.perf_counter(), {}
        initial_eval_loss = eval_loss(reference, task.eval_batches)
        for method in settings["methods"]:
            record = runs[method] = run_method(method, reference, task, settings, initial_eval_loss)
            log(f"{name:<12}{method:<16} init {record['init_seconds']:6.1f} s "
                f"{mib_text(record['init_peak_mib']):>6} MiB"
                f" | train {record['seconds_per_step']:5.2f} s/step {mib_text(record['train_peak_mib']):>6} MiB | eval "
                + " ".join(f"{record['eval_curve'][s]:.4f}" for s in sorted(record["eval_curve"])))
        threshold = runs["lora"]["final_eval_loss"] if "lora" in runs else min(r["final_eval_loss"]
                                                                              for r in runs.values())
        for record in runs.values():
            record["steps_to_threshold"] = steps_to_threshold(record["eval_curve"], threshold)
        summary = {"threshold": threshold, "threshold_definition": "LoRA's final eval loss",
                   **step_ratio(runs.get("lora", {}).get("steps_to_threshold"),
                                runs.get("hf_ext_lora_ga", {}).get("steps_to_threshold"))}
        results[name] = {**summary, "runs": runs}
        metrics.update(task_metrics(name, runs, summary, settings))
        tables.append(finetuning_table(name, runs, summary, settings))
        checks[name] = {
            # every initialisation keeps the model's function (up to rounding): max |Δlogit| on one held-out example
            "init_logits_max_abs_diff": {method: r["init_logits_max_abs_diff"] for method, r in runs.items()},
            "all_finite": all(r["finite"] for r in runs.values()), "curves": len(runs),
        }
        sections[name] = time.perf_counter() - section_start
        log(tables[-1])

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
    log(f"total {sections['total']:.0f} s")
    save_result(result, finetuning_plot(results, settings, dashed=set(GV_MODES)))
    return result


if __name__ == "__main__":
    main()
