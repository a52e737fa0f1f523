"""LoRA-GA initialisation on SmolLM2-135M, all-linear targets: extra peak memory of hf_ext's `get_lora_ga_model` vs
PEFT 0.21's built-in `preprocess_loraga` + `get_peft_model` (fp32, CPU).

hf_ext never forms a weight gradient (a randomized sketch streamed from each target's inputs and output gradients: by
default one forward/backward pass over the batches); PEFT holds the full gradient of every target until
`get_peft_model` has taken each one's SVD. Measured: the peak RSS growth of the whole initialisation call of a fresh
copy of the model (median of ``memory_repeats`` calls per side, alternating order) and its wall time. Goals:
``memory_ratio = PEFT peak / hf_ext peak >= 2.0`` and hf_ext's time at most 2x PEFT's.
``tables.target_gradients_bytes`` is what PEFT holds at its peak (every target weight's fp32 gradient). Checks: both
initialised models reproduce the original logits (≤ 1e-3), both target the same layers, and (informational) how well
our A rows match PEFT's (mean |cosine|, subspace overlap; 1 = the same row space). Data: 4 batches of 2 × 256 tokens
of the Python tutorial.

Run with ``python -m benchmarks.lora_ga_init_memory`` (about 3 minutes on 2 idle cores) or ``--quick`` (a tiny
random Llama with random tokens, seconds: it checks the script, not the goal).
"""

import copy
import statistics
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraGAConfig, LoraLayer, preprocess_loraga
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

from hf_ext.peft import PartlyFrozenLinear, get_lora_ga_model
from hf_ext.peft.gradient_sketch import gradient_passes

from .harness import (configure_threads, fix_mmap_threshold, log, main, make_result, memory_ratio, peak_memory_growth,
                      save_result, speed_ratio)
from .tasks.assets import load_smollm2, smollm2_gguf_path
from .tasks.finetuning_data import random_batches, tiny_llama, tutorial_batches
from .tasks.lora_reports import init_memory_table

NAME = "lora_ga_init_memory"
MEMORY_GOAL = 2.0  # hf_ext's extra peak <= 0.5 x PEFT's
SPEED_GOAL = 0.5  # hf_ext's time <= 2 x PEFT's
LOGITS_TOLERANCE = 1e-3  # max |logit difference| to the original model at initialisation (expected ~1e-5)
COSINE_MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
ADAPTER = "default"

FULL = {
    "model": "smollm2-135m", "rank": 8, "lora_alpha": 16, "target_modules": "all-linear",
    "direction": "ArB2r", "scale": "stable", "stable_gamma": 16,
    "power_iterations": None,  # get_lora_ga_model's default: the one-pass sketch (an int: the range finder)
    "batches": 4, "batch_size": 2, "sequence_length": 256, "memory_repeats": 3, "seed": 0,
}
# A tiny random Llama with random tokens: the same code path in seconds (a smoke test, not a measurement).
TINY_MODEL = {"vocab_size": 200, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
QUICK = {**FULL, "model": "tiny-llama", "batches": 2, "sequence_length": 32, "memory_repeats": 2}


# The two measured initialisations (each changes or wraps the model it gets: pass a fresh copy)

def peer_config(settings: dict, model) -> LoraConfig:
    config = LoraConfig(
        r=settings["rank"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
        task_type="CAUSAL_LM", init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=settings["direction"], scale=settings["scale"],
                                    stable_gamma=settings["stable_gamma"]),
    )
    # preprocess_loraga would match "all-linear" as a regular expression and find nothing: expand it first, as
    # get_peft_model does.
    return _maybe_include_all_linear_layers(config, model)


def candidate_init(model, batches: list[dict], settings: dict):
    """hf_ext: streamed randomized SVD of every target's mean gradient, then the rank-2r PEFT model."""
    config = LoraConfig(r=settings["rank"], lora_alpha=settings["lora_alpha"],
                        target_modules=settings["target_modules"], task_type="CAUSAL_LM")
    return get_lora_ga_model(model, config, batches, num_gradient_batches=len(batches),
                             direction=settings["direction"], scale=settings["scale"],
                             stable_gamma=settings["stable_gamma"], power_iterations=settings["power_iterations"],
                             seed=settings["seed"], show_progress=False)


def peer_init(model, batches: list[dict], settings: dict):
    """PEFT 0.21: accumulate every target's weight gradient, then get_peft_model's per-layer svd_lowrank."""
    config = peer_config(settings, model)
    torch.manual_seed(settings["seed"])  # svd_lowrank draws its test matrix from the global generator
    with warnings.catch_warnings():
        # PEFT's counting hook is a full backward hook on layers whose inputs need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, config, train_step=lambda: [model(**batch).loss.backward() for batch in batches])
    return get_peft_model(model, config)


SIDES = {"candidate": candidate_init, "peer": peer_init}


def target_names(reference, settings: dict) -> list[str]:
    """The Linear layers "all-linear" selects (PEFT's expansion: every nn.Linear but the output head)."""
    return sorted(peer_config(settings, reference).target_modules)


def target_gradient_bytes(reference, names: list[str]) -> int:
    modules = dict(reference.named_modules())
    return sum(4 * modules[name].weight.numel() for name in names)


def lora_layers(peft_model) -> dict:
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}


def a_rows(layer) -> torch.Tensor:
    """The trainable A [r, in] of a LoRA layer (ours: the trainable half of the rank-2r adapter)."""
    module = layer.lora_A[ADAPTER]
    weight = module.trainable if isinstance(module, PartlyFrozenLinear) else module.weight
    return weight.detach().float().clone()


def cosine_layer_names(num_layers: int) -> list[str]:
    indices = sorted({0, num_layers // 2, num_layers - 1})
    return [f"model.layers.{i}.{module}" for i in indices for module in COSINE_MODULES]


def measure(side: str, reference, batches: list[dict], settings: dict) -> tuple[int, float, object]:
    """(peak RSS growth, seconds, initialised model) of one initialisation of a fresh copy of ``reference``."""
    model = copy.deepcopy(reference)  # outside the measured call
    box = {}

    def call():
        start = time.perf_counter()
        box["model"] = SIDES[side](model, batches, settings)
        box["seconds"] = time.perf_counter() - start

    peak = peak_memory_growth(call)
    return peak, box["seconds"], box["model"]


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=batch["input_ids"]).logits
    finally:
        model.train(was_training)


def row_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Mean |cosine| of corresponding rows and the subspace overlap ‖Â_ours Â_theirsᵀ‖²_F / r of the row spaces."""
    ours = ours / ours.norm(dim=1, keepdim=True)
    theirs = theirs / theirs.norm(dim=1, keepdim=True)
    cosines = (ours * theirs).sum(dim=1).abs()
    return {"mean_abs_row_cosine": cosines.mean().item(), "row_cosines": [round(c, 6) for c in cosines.tolist()],
            "subspace_overlap": ((ours @ theirs.T).square().sum() / ours.shape[0]).item()}


def warm_up(settings: dict, reference, batch: dict) -> None:
    """First calls of both code paths (tiny model) and a forward/backward of ``reference``, outside the measurements."""
    tiny = tiny_llama(TINY_MODEL, seed=123)
    tiny_batches = random_batches(TINY_MODEL["vocab_size"], 1, 2, 16, seed=123)
    for init in SIDES.values():
        init(copy.deepcopy(tiny), tiny_batches, settings)
    parameters = [p for p in reference.parameters() if p.requires_grad]
    with torch.enable_grad():
        torch.autograd.grad(reference(**batch).loss, parameters)  # the gradients are dropped at once


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    threads = configure_threads()
    sections, section_start = {}, time.perf_counter()
    if settings["model"] == "tiny-llama":
        reference = tiny_llama(TINY_MODEL, settings["seed"])
        batches = random_batches(TINY_MODEL["vocab_size"], settings["batches"], settings["batch_size"],
                                 settings["sequence_length"], seed=settings["seed"] + 1)
        settings.update({"model_config": TINY_MODEL, "data": "random token ids, labels = input_ids"})
    else:
        reference, tokenizer = load_smollm2()
        batches = tutorial_batches(tokenizer, settings["batches"], settings["batch_size"], settings["sequence_length"])
        settings.update({"model_file": smollm2_gguf_path().name,
                         "data": "Python 3.11 tutorial (python_doc_files, tutorial/*.rst.txt), consecutive blocks, "
                                 "labels = input_ids"})
    sections["load"] = time.perf_counter() - section_start
    names = target_names(reference, settings)
    if not names:
        raise RuntimeError(f"{settings['target_modules']!r} selects no nn.Linear layer of the model (a GGUF model "
                           "loaded with packed GgufLinear layers? uninstall `kernels` to dequantise it)")
    gradient_bytes = target_gradient_bytes(reference, names)
    num_layers = reference.config.num_hidden_layers
    settings.update({
        "dtype": "float32", "device": "cpu", "threads": threads,
        "parameters": sum(p.numel() for p in reference.parameters()),
        "tokens_per_batch": settings["batch_size"] * settings["sequence_length"],
        "target_layers": len(names),
        "candidate_gradient_passes": gradient_passes(settings["power_iterations"]),
        "peer_gradient_passes": 1,
        "peer_target_modules": "PEFT's _maybe_include_all_linear_layers expansion of 'all-linear' (preprocess_loraga "
                               "does not expand it itself)",
        "measured_call": "the whole initialisation (gradient estimation + get_peft_model) of a fresh deepcopy of the "
                         "loaded model, copied outside the measured call",
        "memory_order": "candidate first on even repeats, peer first on odd ones",
    })
    log(f"{settings['model']}: {settings['parameters']:,} parameters, {len(names)} targets "
        f"(their fp32 gradients: {gradient_bytes / 2**20:.1f} MiB), {len(batches)} batches of "
        f"{settings['batch_size']} x {settings['sequence_length']} tokens, {threads} threads")

    section_start = time.perf_counter()
    fix_mmap_threshold()  # as compare_peak_memory does: freed large blocks go back to the OS
    reference_logits = logits_of(reference, batches[0])
    warm_up(settings, reference, batches[0])
    sections["warm_up"] = time.perf_counter() - section_start

    peaks, seconds = {"candidate": [], "peer": []}, {"candidate": [], "peer": []}
    checks = {"logits_batch_tokens": settings["tokens_per_batch"], "logits_tolerance": LOGITS_TOLERANCE}
    rows, targets = {}, {}
    section_start = time.perf_counter()
    for repeat in range(settings["memory_repeats"]):
        order = ("candidate", "peer") if repeat % 2 == 0 else ("peer", "candidate")
        for side in order:
            peak, elapsed, peft_model = measure(side, reference, batches, settings)
            peaks[side].append(peak)
            seconds[side].append(elapsed)
            log(f"repeat {repeat} {side:<9}: extra peak {peak / 2**20:8.1f} MiB, {elapsed:7.1f} s")
            if repeat == 0:
                difference = (logits_of(peft_model, batches[0]) - reference_logits).abs().max().item()
                checks[f"{side}_logits_max_abs_diff"] = difference
                layers = lora_layers(peft_model)
                targets[side] = sorted(layers)
                rows[side] = {name: a_rows(layers[name]) for name in cosine_layer_names(num_layers)}
            del peft_model
    sections["memory"] = time.perf_counter() - section_start

    checks["reference_logits_max_abs"] = reference_logits.abs().max().item()
    checks["same_targets"] = targets["candidate"] == targets["peer"] == names
    checks["targets"] = len(targets["candidate"])
    checks["logits_passed"] = all(checks[f"{side}_logits_max_abs_diff"] <= LOGITS_TOLERANCE for side in SIDES)
    agreement = {name: row_agreement(rows["candidate"][name], rows["peer"][name]) for name in rows["candidate"]}
    checks["a_rows_vs_peft"] = {
        "informational": True,
        "layers": agreement,
        "mean_abs_row_cosine": statistics.mean(v["mean_abs_row_cosine"] for v in agreement.values()),
        "mean_subspace_overlap": statistics.mean(v["subspace_overlap"] for v in agreement.values()),
    }
    checks["passed"] = checks["logits_passed"] and checks["same_targets"]
    log(f"checks: passed={checks['passed']}; logits max |diff| hf_ext {checks['candidate_logits_max_abs_diff']:.2e}, "
        f"PEFT {checks['peer_logits_max_abs_diff']:.2e}; A rows vs PEFT: mean |cos| "
        f"{checks['a_rows_vs_peft']['mean_abs_row_cosine']:.4f}, subspace overlap "
        f"{checks['a_rows_vs_peft']['mean_subspace_overlap']:.4f}")
    if not checks["passed"]:
        log("WARNING: an initialised model does not reproduce the original logits, or the targets differ")

    metrics = build_metrics(settings, peaks, seconds)
    tables = {
        "target_gradients_bytes": gradient_bytes,
        "target_gradients_mib": gradient_bytes / 2**20,
        "peak_bytes_samples": peaks,
        "init_seconds_samples": seconds,
        "extra_peak_mib": {side: statistics.median(values) / 2**20 for side, values in peaks.items()},
        "extra_peak_over_target_gradients": {side: statistics.median(values) / gradient_bytes
                                             for side, values in peaks.items()},
        "init_seconds": {side: statistics.median(values) for side, values in seconds.items()},
    }
    sections["total"] = time.perf_counter() - started
    tables["sections_seconds"] = sections
    result = make_result(NAME, candidate="hf_ext get_lora_ga_model", peer="PEFT preprocess_loraga + get_peft_model",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["tables"] = tables
    result["markdown_tables"] = [init_memory_table(settings, tables, checks, MEMORY_GOAL, len(COSINE_MODULES))]
    log(result["markdown_tables"][0])
    log(f"total {sections['total']:.0f} s")
    save_result(result)
    return result


def build_metrics(settings: dict, peaks: dict, seconds: dict) -> dict:
    """The RESULTS.md rows: extra peak memory and wall time of the initialisation, each with its goal."""
    candidate_bytes = int(statistics.median(peaks["candidate"]))
    peer_bytes = int(statistics.median(peaks["peer"]))
    ratio = memory_ratio(candidate_bytes, peer_bytes)
    time_ratio = speed_ratio(seconds["candidate"], seconds["peer"])
    what = (f"{settings['model']}, LoRA r={settings['rank']} {settings['target_modules']}, {settings['batches']} "
            f"batches of {settings['batch_size']} x {settings['sequence_length']} tokens")
    return {
        "init_peak_memory": {
            "description": f"peak RSS growth of the whole LoRA-GA initialisation ({what}): hf_ext get_lora_ga_model "
                           "vs PEFT preprocess_loraga + get_peft_model",
            "unit": "MiB", "candidate": candidate_bytes / 2**20, "peer": peer_bytes / 2**20,
            "candidate_peak_bytes": candidate_bytes, "peer_peak_bytes": peer_bytes,
            "candidate_peak_bytes_samples": peaks["candidate"], "peer_peak_bytes_samples": peaks["peer"],
            "memory_ratio": ratio,
            # RESULTS.md renders speed_ratio as the ratio column; here it is the memory ratio.
            "speed_ratio": ratio,
            "ratio_definition": "memory_ratio = PEFT peak / hf_ext peak; > 1 means hf_ext needs less memory",
            "goal": f"memory_ratio >= {MEMORY_GOAL} (hf_ext <= 0.5x PEFT's extra peak)",
            "min_memory_ratio": MEMORY_GOAL, "min_speed_ratio": None,
            "passed": None if ratio is None else bool(ratio >= MEMORY_GOAL),
        },
        "init_seconds": {
            "description": f"wall time of the same initialisation calls ({what}; hf_ext: "
                           f"{settings['candidate_gradient_passes']} gradient passes, PEFT: 1; measured with glibc's "
                           "mmap threshold fixed)",
            "unit": "s",
            "candidate": float(statistics.median(seconds["candidate"])),
            "peer": float(statistics.median(seconds["peer"])),
            "candidate_seconds": seconds["candidate"], "peer_seconds": seconds["peer"],
            "speed_ratio": time_ratio,
            "goal": f"speed_ratio >= {SPEED_GOAL} (hf_ext <= 2x PEFT's time)", "min_speed_ratio": SPEED_GOAL,
            "passed": None if time_ratio is None else bool(time_ratio >= SPEED_GOAL),
        },
    }


if __name__ == "__main__":
    main()
