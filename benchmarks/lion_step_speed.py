"""Lion optimizer step time on SmolLM2-135M's parameter set (134.5M fp32 parameters, fixed gradients, CPU): hf_ext's
fused and foreach kernels vs fused AdamW and the other Lion implementations, in one process.

Only the optimizer step is timed. Goals: Lion(fused=True) and Lion(params) as users write it (which picks the fused
kernel, here its C form) step time <= 0.8x ``torch.optim.AdamW(fused=True)``'s (``speed_ratio = AdamW time / Lion
time >= 1.25``), and Lion's state half of AdamW's (state bytes ratio >= 2). The other rows (the fused kernel's
torch.compile form, foreach Lion, lion_pytorch, bitsandbytes, AdamW(foreach)) are informational; speed_ratio = peer
time / candidate time, > 1: ours is faster. Results go to ``results/lion_step_speed.json`` on 2 threads (the default)
and ``results/lion_step_speed_1_thread.json`` with ``HF_EXT_BENCH_THREADS=1``.

``checks``: fused Lion bit-identical (parameters and momenta after 3 steps) to foreach Lion and lion_pytorch.Lion.
``tables.optimizers``: median step time, state bytes and achieved bandwidth (nominal traffic: Lion 5, AdamW 7 tensors
of 4 B x parameters, over time) against the machine's copy and in-place-add bandwidth. ``tables.compile``: the fused
kernel's first step in this process and its compile time in fresh processes.

Run with ``python -m benchmarks.lion_step_speed`` (2-3 minutes on 2 cores, plus the cold compile) or ``--quick``.
"""

import os
import statistics
import time

import torch

from .harness import (THREADS_ENVIRONMENT_VARIABLE, compare, configure_threads, informational_metric, log, main,
                      make_result, save_result)
from .tasks.lion_machine import BYTES_PER_ELEMENT, cold_compile, pooled_bandwidth, reference_bandwidth
from .tasks.parameter_sets import (ADAMW_HYPER, LION_HYPER, OPTIMIZERS, SMOLLM2_135M, build_parameters,
                                   check_identical, make_optimizer, state_bytes)

NAME = "lion_step_speed"
DEFAULT_THREADS = 2
TIME_GOAL = 1.25  # Lion(fused) time <= 0.8 x AdamW(fused) time
STATE_GOAL = 2.0  # Lion state = half of AdamW's

# The bit-identity checks run on two of SmolLM2's layers: every tensor shape of the model, the full embedding
# included, on both sides of the fused kernel's size threshold.
CHECK_MODEL = dict(SMOLLM2_135M, num_hidden_layers=2)
# Quick: small enough for seconds, yet with tensors on both sides of the fused kernel's size threshold (32768).
QUICK_MODEL = {"vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 1, "kv_size": 64, "intermediate_size": 512}

# Rounds per comparison: the goal comparison gets many, lion_pytorch's slow foreach class few.
FULL = {"model": SMOLLM2_135M, "check_model": CHECK_MODEL, "goal_rounds": 41, "rounds": 9, "slow_rounds": 3,
        "warmup_steps": 2, "copy_repeats": 9, "cold_compile": True}
QUICK = {"model": QUICK_MODEL, "check_model": QUICK_MODEL, "goal_rounds": 5, "rounds": 3, "slow_rounds": 2,
         "warmup_steps": 1, "copy_repeats": 3, "cold_compile": False}

# (metric name, candidate, peer, rounds key, goal); the candidate and peer are keys of OPTIMIZERS.
COMPARISONS = [
    ("lion_fused_vs_adamw_fused", "lion_fused", "adamw_fused", "goal_rounds", TIME_GOAL),
    ("lion_default_vs_adamw_fused", "lion_default", "adamw_fused", "goal_rounds", TIME_GOAL),
    ("lion_foreach_vs_adamw_fused", "lion_foreach", "adamw_fused", "rounds", None),
    ("lion_fused_vs_lion_torch_compile", "lion_fused", "lion_torch_compile", "rounds", None),
    ("lion_fused_vs_lion_foreach", "lion_fused", "lion_foreach", "rounds", None),
    ("lion_fused_vs_lion_pytorch", "lion_fused", "lion_pytorch", "rounds", None),
    ("lion_fused_vs_bitsandbytes", "lion_fused", "bitsandbytes", "rounds", None),
    ("lion_fused_vs_adamw_foreach", "lion_fused", "adamw_foreach", "rounds", None),
    ("lion_fused_vs_lion_pytorch_foreach", "lion_fused", "lion_pytorch_foreach", "slow_rounds", None),
]


def _setup_threads() -> int:
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(DEFAULT_THREADS)
    return configure_threads()


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    threads = _setup_threads()  # before the first compile: the fused kernel's thread count is fixed there
    model = settings["model"]
    params = build_parameters(model)
    numel = sum(p.numel() for p in params)
    settings.update({
        "parameters": numel, "parameter_tensors": len(params), "dtype": "float32", "device": "cpu",
        "threads": threads, "lion_hyper_parameters": dict(LION_HYPER, betas=list(LION_HYPER["betas"])),
        "adamw_hyper_parameters": dict(ADAMW_HYPER, betas=list(ADAMW_HYPER["betas"])),
        "gradients": "fixed, N(0, 1e-3^2), shared by every optimizer; parameters N(0, 0.02^2), shared",
        "nominal_bytes_per_step": {"lion": 5 * BYTES_PER_ELEMENT * numel, "adamw": 7 * BYTES_PER_ELEMENT * numel},
        "optimizers": {name: description for name, (_, _, description) in OPTIMIZERS.items()},
    })
    log(f"{numel:,} parameters in {len(params)} tensors, {threads} threads")

    # 1. The first step of our two kernels on the full set (the fused one compiles, or loads from torch's cache,
    # here: nothing has called it yet in this process), then bit-identity checks, then the cold compile.
    sections = {}
    optimizers, first_step = {}, {}
    for name in ("lion_fused", "lion_foreach"):
        optimizers[name] = make_optimizer(name, params)
        start = time.perf_counter()
        optimizers[name].step()
        first_step[name] = time.perf_counter() - start
    sections["first_steps"] = sum(first_step.values())
    section_start = time.perf_counter()
    checks = check_identical(settings["check_model"])
    sections["checks"] = time.perf_counter() - section_start
    log(f"checks: passed={checks['passed']}; " + ", ".join(
        f"{k}: {v['params_bit_identical']}/{v['momenta_bit_identical']}" for k, v in checks.items()
        if isinstance(v, dict) and "params_bit_identical" in v))
    if not checks["passed"]:
        log("WARNING: the fused Lion does not reproduce foreach Lion / lion_pytorch bit for bit (see checks)")
    compile_info = {"first_step_seconds": first_step,
                    "note": "first step of each of our kernels in this process, on the full parameter set: momentum "
                            "allocation, plus for the fused kernel the build of its C form"}
    if settings["cold_compile"]:
        section_start = time.perf_counter()
        compile_info["cold_compile"] = cold_compile(threads)
        sections["cold_compile"] = time.perf_counter() - section_start
        log(f"cold compile: {compile_info['cold_compile']}")

    # 2. Timing. One optimizer per side, created and warmed up when first needed, dropped when no longer needed.
    section_start = time.perf_counter()
    references = [reference_bandwidth(numel, settings["copy_repeats"])]
    metrics, step_seconds, states = {}, {}, {}
    remaining = [name for _, a, b, _, _ in COMPARISONS for name in (a, b)]
    for metric_name, candidate, peer, rounds_key, goal in COMPARISONS:
        for name in (candidate, peer):
            if name not in states:  # first use: create (unless the first-step phase did), warm up, measure state
                if name not in optimizers:
                    optimizers[name] = make_optimizer(name, params)
                if optimizers[name] is not None:
                    for _ in range(settings["warmup_steps"]):
                        optimizers[name].step()
                    states[name] = state_bytes(optimizers[name])
        if optimizers[candidate] is not None and optimizers[peer] is not None:
            metrics[metric_name] = compare(
                optimizers[candidate].step, optimizers[peer].step, work=1, unit="steps/s",
                repeats=settings[rounds_key], warmup=1, min_speed_ratio=goal,
                description=f"one optimizer step over {numel:,} fp32 parameters: {OPTIMIZERS[candidate][2]} vs "
                            f"{OPTIMIZERS[peer][2]}")
            metrics[metric_name].update(candidate_optimizer=candidate, peer_optimizer=peer)
            for name, side in ((candidate, "candidate"), (peer, "peer")):
                step_seconds.setdefault(name, []).extend(metrics[metric_name][f"{side}_seconds"])
            row = metrics[metric_name]
            log(f"{metric_name}: {row['candidate_median_seconds'] * 1e3:.1f} ms vs "
                  f"{row['peer_median_seconds'] * 1e3:.1f} ms, speed_ratio {row['speed_ratio']:.3f}"
                  + (f" (goal >= {goal})" if goal else ""))
        for name in (candidate, peer):
            remaining.remove(name)
            if name not in remaining:
                optimizers.pop(name, None)
    references.append(reference_bandwidth(numel, settings["copy_repeats"]))
    sections["timing"] = time.perf_counter() - section_start

    # 3. State bytes and bandwidth.
    bandwidth = {name: pooled_bandwidth(references, name) for name in ("copy", "inplace_add")}
    copy_bandwidth_bytes = bandwidth["copy"]
    table = optimizer_table(numel, step_seconds, states, bandwidth)
    if "lion_fused" in states and "adamw_fused" in states:
        ratio = states["adamw_fused"] / states["lion_fused"]
        metrics["state_bytes_vs_adamw_fused"] = {
            "description": "optimizer state after a step (sum of the state tensors' nbytes): Lion(fused) vs "
                           "AdamW(fused)",
            "unit": "MiB", "candidate": states["lion_fused"] / 2**20, "peer": states["adamw_fused"] / 2**20,
            "candidate_bytes": states["lion_fused"], "peer_bytes": states["adamw_fused"],
            # RESULTS.md renders speed_ratio as the ratio column; here it is a ratio of state sizes.
            "speed_ratio": ratio, "state_ratio": ratio,
            "ratio_definition": "AdamW state bytes / Lion state bytes; > 1 means Lion keeps less state",
            "goal": f"state ratio >= {STATE_GOAL}", "min_speed_ratio": STATE_GOAL,
            "passed": bool(ratio >= STATE_GOAL),
        }
    if "lion_fused" in table:
        achieved = table["lion_fused"]["achieved_bytes_per_second"]
        metrics["lion_fused_bandwidth_vs_copy"] = informational_metric(
            "achieved bandwidth of the fused Lion step (5 x 4 B x parameters / median step time) vs the machine's "
            "copy bandwidth (dst.copy_(src), 2 x bytes / time, same total size)", "GB/s", achieved / 1e9,
            copy_bandwidth_bytes / 1e9, achieved / copy_bandwidth_bytes,
            "achieved / copy bandwidth (fraction of the machine's copy bandwidth)")

    tables = {"optimizers": table, "reference_bandwidth": {
        "runs": references, "copy_bytes_per_second": bandwidth["copy"],
        "inplace_add_bytes_per_second": bandwidth["inplace_add"],
        "method": "dst.copy_(src): 2 x bytes / time; dst.add_(src): 3 x bytes / time; median over the calls "
                  "before and after the timing, fp32 tensors of the parameter count"},
        "compile": compile_info, "sections_seconds": sections, "total_seconds": time.perf_counter() - started}
    # a full run on another thread count keeps its own result file beside the 2-thread one
    name = NAME if quick or threads == DEFAULT_THREADS else f"{NAME}_{threads}_thread{'s' * (threads > 1)}"
    result = make_result(name, candidate="hf_ext Lion(fused=True) (defaults in lion_default, foreach=True in "
                                          "lion_foreach rows)",
                         peer="torch AdamW(fused=True) and the other optimizers named per metric",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["tables"] = tables
    shapes = ("SmolLM2-135M's shapes" if model == SMOLLM2_135M else
              f"quick: {model['num_hidden_layers']} layer(s), vocab {model['vocab_size']}, "
              f"hidden {model['hidden_size']}")
    result["markdown_tables"] = [markdown_table(numel, table, bandwidth, compile_info, threads, shapes)]
    save_result(result)
    log(result["markdown_tables"][0])
    log(f"total {tables['total_seconds']:.0f} s")
    return result


def optimizer_table(numel: int, step_seconds: dict, states: dict, bandwidth: dict) -> dict:
    """Per optimizer: median step time over all its timed steps, state bytes, nominal traffic and bandwidth."""
    reference = statistics.median(step_seconds["adamw_fused"]) if step_seconds.get("adamw_fused") else None
    table = {}
    for name, seconds in step_seconds.items():
        median = statistics.median(seconds)
        moved = OPTIMIZERS[name][1] * BYTES_PER_ELEMENT * numel
        table[name] = {
            "optimizer": OPTIMIZERS[name][2], "median_step_seconds": median, "timed_steps": len(seconds),
            "time_vs_adamw_fused": None if reference is None else median / reference,
            "state_bytes": states.get(name), "nominal_bytes_per_step": moved,
            "achieved_bytes_per_second": moved / median,
            "fraction_of_copy_bandwidth": moved / median / bandwidth["copy"],
            "fraction_of_inplace_add_bandwidth": moved / median / bandwidth["inplace_add"],
        }
    return table


def markdown_table(numel: int, table: dict, bandwidth: dict, compile_info: dict, threads: int,
                   shapes: str = "SmolLM2-135M's shapes") -> str:
    rows = [f"One optimizer step over {numel:,} fp32 parameters ({shapes}), {threads} threads; median over every "
            "timed step of that optimizer. Achieved bandwidth = nominal traffic (Lion 5, AdamW 7 tensors of "
            f"4 B × parameters) / time. The machine's copy bandwidth (dst.copy_(src), 2 × bytes / time): "
            f"{bandwidth['copy'] / 1e9:.1f} GB/s; in-place add (dst.add_(src), 3 × bytes / time): "
            f"{bandwidth['inplace_add'] / 1e9:.1f} GB/s (a copy also reads its destination before writing it, so "
            "in-place kernels can exceed the copy figure).", "",
            "| optimizer | step time | × AdamW(fused) time | state | achieved bandwidth | of copy | of in-place add |",
            "|---|---|---|---|---|---|---|"]
    for entry in sorted(table.values(), key=lambda e: e["median_step_seconds"]):
        ratio = entry["time_vs_adamw_fused"]
        state = entry["state_bytes"]
        rows.append(f"| {entry['optimizer']} | {entry['median_step_seconds'] * 1e3:.1f} ms | "
                    f"{'—' if ratio is None else f'{ratio:.2f}'} | "
                    f"{'—' if state is None else f'{state / 2**20:.0f} MiB'} | "
                    f"{entry['achieved_bytes_per_second'] / 1e9:.1f} GB/s | "
                    f"{entry['fraction_of_copy_bandwidth']:.0%} | {entry['fraction_of_inplace_add_bandwidth']:.0%} |")
    first = compile_info.get("first_step_seconds", {})
    line = "First step in the run: " + ", ".join(f"{k} {v:.2f} s" for k, v in first.items())
    cold = compile_info.get("cold_compile", {})
    if "c_kernel" in cold:
        built, compiled = cold["c_kernel"]["empty_cache"], cold["torch_compile"]
        line += (f"; fused kernel build in a fresh process: C kernel {built['compile_seconds']:.2f} s; "
                 f"its torch.compile form {compiled['empty_cache']['compile_seconds']:.1f} s with an empty inductor "
                 f"cache, {compiled['filled_cache']['compile_seconds']:.1f} s with it filled")
    rows += ["", line + "."]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
