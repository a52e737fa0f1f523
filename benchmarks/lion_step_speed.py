"""Lion optimizer step time on SmolLM2-135M's parameter set: hf_ext's fused and foreach kernels vs fused AdamW and
the other Lion implementations, in one process (fp32, CPU).

The parameters are fp32 tensors with SmolLM2-135M's shapes (tied 49152 × 576 embedding, 30 layers of q 576×576,
k/v 192×576, o 576×576, gate/up 1536×576, down 576×1536 and two RMSNorm weights of 576, a final norm: 134,515,008
parameters), each with a fixed random gradient; only the optimizer step is timed (no forward or backward). A step is
memory-bound: Lion reads θ, g, m and writes θ, m (5 tensors of traffic), AdamW reads θ, g, m, v and writes θ, m, v
(7 tensors). Hence the goals of the issue:

* **time**: Lion(fused=True) ≤ 0.8× the step time of ``torch.optim.AdamW(fused=True)`` (the fastest optimizer torch
  ships for CPU), i.e. ``speed_ratio = AdamW time / Lion time >= 1.25``;
* **state**: Lion's optimizer state (one momentum per parameter) half of AdamW's (``exp_avg`` and ``exp_avg_sq``),
  i.e. AdamW state bytes / Lion state bytes >= 2 (the sum of the state tensors' ``nbytes`` after a step).

Candidates: ``hf_ext.optim.Lion(fused=True)`` (one ``torch.compile``-d pass over memory per large tensor) and
``Lion(foreach=True)`` (the fallback without a C++ compiler). Peers, each timed against the fused Lion with
`hf_ext.benchmarking.compare` (interleaved rounds, speed_ratio = peer time / candidate time, > 1: ours is faster):
``torch.optim.AdamW(fused=True)`` (the goal), ``lion_pytorch.Lion`` (its constructor has no foreach switch: this
class updates one tensor at a time; the package's separate ``lion_pytorch.foreach.Lion`` is timed too), bitsandbytes'
``Lion(optim_bits=32)`` (its CPU backend runs plain torch ops per tensor), ``torch.optim.AdamW(foreach=True)``; and
the foreach Lion against both AdamW(fused) and the fused Lion. Everything but the AdamW goal is informational. All
optimizers step the same parameter tensors with the same gradients (each keeps its own state; the parameter values
do not change the speed of these element-wise kernels), and each optimizer takes two untimed steps first.

Before timing, ``checks`` records whether three steps from the same start give bit-identical parameters and momenta
for fused vs foreach Lion and vs ``lion_pytorch.Lion`` and bitsandbytes' 32-bit Lion (all compute
β·m + (1 − β)·g with the same fused multiply-adds), and the largest difference to ``lion_pytorch.foreach.Lion``
(which interpolates with ``lerp``, a different rounding, so its momentum is not expected to agree bit for bit). The
checks run on the embedding and two of the 30 layers (35.4M parameters, every tensor shape of the model, on both
sides of the fused kernel's size threshold): the kernels are element-wise per tensor, so more layers would only
repeat the same shapes, and lion_pytorch's foreach class takes seconds per step.

The fused kernel is compiled on its first call. Its cost is reported apart from the step times: ``first_step``
times the first step of each of our kernels on the full set, before anything else calls them in this process
(momentum allocation, plus for the fused one the compilation or, if torch's on-disk cache already holds the kernel,
loading it), and ``cold_compile`` times the
first call in two fresh processes sharing a new, empty inductor cache directory (the first compiles from scratch,
the second finds the cache filled, as a restarted training run would).

Bandwidth: achieved = nominal bytes per step / median step time, with nominal bytes = 5 × 4 B × parameters for
every Lion and 7 × 4 B × parameters for AdamW (the least traffic the update needs; the foreach and per-tensor paths
actually move more, through temporaries). It is reported next to the machine's copy bandwidth, measured as
``dst.copy_(src)`` on one fp32 tensor of the same total size (2 × its bytes / time), before and after the timing,
and next to an in-place ``dst.add_(src)`` (3 × bytes / time). The copy figure understates what the memory system
delivers to in-place kernels: a copy's destination lines are read into the cache before they are overwritten
(write-allocate), so it moves about 3 × bytes for the 2 × counted, and an optimizer step, which writes only what it
has just read, can reach more than 100 % of it.

Run with ``hf-ext bench lion_step_speed`` (2-3 minutes on an idle 2-core machine, plus the cold compile) or
``--quick`` (seconds: one small layer, about 0.9M parameters, no cold-compile subprocess). It uses 2 torch threads
unless ``HF_EXT_BENCH_THREADS=N`` says otherwise.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hf_ext.benchmarking import THREADS_ENVIRONMENT_VARIABLE, compare, configure_threads, make_result, save_result
from hf_ext.optim import Lion

NAME = "lion_step_speed"
DEFAULT_THREADS = 2
TIME_GOAL = 1.25  # Lion(fused) time <= 0.8 x AdamW(fused) time
STATE_GOAL = 2.0  # Lion state = half of AdamW's
BYTES_PER_ELEMENT = 4  # fp32
CHECK_STEPS = 3
BENCH_DIR = Path(__file__).resolve().parent

# SmolLM2-135M (its config.json): hidden 576, 9 query / 3 key-value heads of 64, SwiGLU 1536, tied embeddings.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30, "kv_size": 192,
                "intermediate_size": 1536}
# The bit-identity checks run on two of its layers (every tensor shape of the model, the full embedding included,
# on both sides of the fused kernel's size threshold) rather than all 30: the kernels are element-wise per tensor,
# and lion_pytorch's foreach class takes seconds per step on the full set.
CHECK_MODEL = dict(SMOLLM2_135M, num_hidden_layers=2)
# Quick: small enough for seconds, yet with tensors on both sides of the fused kernel's size threshold (32768).
QUICK_MODEL = {"vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 1, "kv_size": 64, "intermediate_size": 512}

LION_HYPER = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
ADAMW_HYPER = {"lr": 3e-4, "betas": (0.9, 0.999), "weight_decay": 0.01}

# Rounds per comparison. A fused Lion step takes ~0.1 s, so the goal comparison gets many rounds; lion_pytorch's
# foreach class takes seconds per step and gets few.
FULL = {"model": SMOLLM2_135M, "check_model": CHECK_MODEL, "goal_rounds": 21, "rounds": 9, "slow_rounds": 3,
        "warmup_steps": 2, "copy_repeats": 9, "cold_compile": True}
QUICK = {"model": QUICK_MODEL, "check_model": QUICK_MODEL, "goal_rounds": 5, "rounds": 3, "slow_rounds": 2,
         "warmup_steps": 1, "copy_repeats": 3, "cold_compile": False}


# ---------------------------------------------------------------------------------------------------------------
# Parameters and optimizers


def parameter_shapes(model: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a Llama-style decoder with tied embeddings, in model order."""
    hidden, kv, inter = model["hidden_size"], model["kv_size"], model["intermediate_size"]
    shapes = [("embed_tokens", (model["vocab_size"], hidden))]
    for layer in range(model["num_hidden_layers"]):
        prefix = f"layers.{layer}."
        shapes += [(prefix + name, shape) for name, shape in (
            ("q_proj", (hidden, hidden)), ("k_proj", (kv, hidden)), ("v_proj", (kv, hidden)),
            ("o_proj", (hidden, hidden)), ("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)), ("input_layernorm", (hidden,)),
            ("post_attention_layernorm", (hidden,)))]
    shapes.append(("norm", (hidden,)))
    return shapes


def build_parameters(model: dict, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 parameters of ``parameter_shapes(model)`` with fixed random gradients (N(0, 1e-3²)) in ``.grad``."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in parameter_shapes(model):
        param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=generator))
        param.grad = 1e-3 * torch.randn(shape, generator=generator)
        params.append(param)
    return params


def _lion_pytorch(params):
    from lion_pytorch import Lion as LionPytorch  # per-tensor class; no foreach argument

    return LionPytorch(params, **LION_HYPER)


def _lion_pytorch_foreach(params):
    from lion_pytorch.foreach import Lion as LionPytorchForeach

    return LionPytorchForeach(params, **LION_HYPER)


def _bitsandbytes(params):
    import bitsandbytes

    return bitsandbytes.optim.Lion(params, optim_bits=32, **LION_HYPER)


# name -> (factory, nominal tensors of traffic per step, what it is)
OPTIMIZERS: dict[str, tuple[Callable, int, str]] = {
    "lion_fused": (lambda params: Lion(params, fused=True, **LION_HYPER), 5, "hf_ext Lion(fused=True)"),
    "lion_foreach": (lambda params: Lion(params, foreach=True, **LION_HYPER), 5, "hf_ext Lion(foreach=True)"),
    "adamw_fused": (lambda params: torch.optim.AdamW(params, fused=True, **ADAMW_HYPER), 7,
                    "torch.optim.AdamW(fused=True)"),
    "adamw_foreach": (lambda params: torch.optim.AdamW(params, foreach=True, **ADAMW_HYPER), 7,
                      "torch.optim.AdamW(foreach=True)"),
    "lion_pytorch": (_lion_pytorch, 5, "lion_pytorch.Lion (per tensor)"),
    "lion_pytorch_foreach": (_lion_pytorch_foreach, 5, "lion_pytorch.foreach.Lion (lerp)"),
    "bitsandbytes": (_bitsandbytes, 5, "bitsandbytes.optim.Lion(optim_bits=32)"),
}

# (metric name, candidate, peer, rounds key, goal); the candidate and peer are keys of OPTIMIZERS.
COMPARISONS = [
    ("lion_fused_vs_adamw_fused", "lion_fused", "adamw_fused", "goal_rounds", TIME_GOAL),
    ("lion_foreach_vs_adamw_fused", "lion_foreach", "adamw_fused", "rounds", None),
    ("lion_fused_vs_lion_foreach", "lion_fused", "lion_foreach", "rounds", None),
    ("lion_fused_vs_lion_pytorch", "lion_fused", "lion_pytorch", "rounds", None),
    ("lion_fused_vs_bitsandbytes", "lion_fused", "bitsandbytes", "rounds", None),
    ("lion_fused_vs_adamw_foreach", "lion_fused", "adamw_foreach", "rounds", None),
    ("lion_fused_vs_lion_pytorch_foreach", "lion_fused", "lion_pytorch_foreach", "slow_rounds", None),
]


def make_optimizer(name: str, params) -> torch.optim.Optimizer | None:
    """The optimizer ``name`` of `OPTIMIZERS` over ``params``; None if its package is not installed."""
    try:
        return OPTIMIZERS[name][0](params)
    except ImportError as error:
        print(f"{name}: not available ({error})")
        return None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer's per-parameter state (non-tensor entries such as int steps: 0)."""
    return sum(value.nbytes for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))


def momentum_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    state = optimizer.state[param]
    return state.get("exp_avg", state.get("state1"))


def _clone_with_grads(params) -> list[torch.nn.Parameter]:
    clones = []
    for param in params:
        clone = torch.nn.Parameter(param.detach().clone())
        clone.grad = param.grad  # shared, read-only for every optimizer here
        clones.append(clone)
    return clones


def check_identical(model: dict, steps: int = CHECK_STEPS, seed: int = 1) -> dict:
    """Run `steps` steps of each Lion on parameters and gradients of ``model``'s shapes (`build_parameters`) from
    the same start and compare parameters and momenta with the fused kernel's: bit equality and largest difference.
    """
    params = build_parameters(model, seed)
    reference = None
    checks = {"steps": steps, "parameters": sum(p.numel() for p in params), "model": model,
              "hyper_parameters": dict(LION_HYPER, betas=list(LION_HYPER["betas"]))}
    for name in ("lion_fused", "lion_foreach", "lion_pytorch", "bitsandbytes", "lion_pytorch_foreach"):
        clones = _clone_with_grads(params)
        optimizer = make_optimizer(name, clones)
        if optimizer is None:
            checks[f"fused_vs_{name}"] = "not installed"
            continue
        for _ in range(steps):
            optimizer.step()
        momenta = [momentum_of(optimizer, p) for p in clones]
        if reference is None:
            reference = ([p.detach() for p in clones], momenta)
            continue
        checks[f"fused_vs_{name}"] = {
            "params_bit_identical": all(torch.equal(a, b) for a, b in zip(reference[0], clones)),
            "momenta_bit_identical": all(torch.equal(a, b) for a, b in zip(reference[1], momenta)),
            "max_abs_param_diff": max((a - b).abs().max().item() for a, b in zip(reference[0], clones)),
            "max_abs_momentum_diff": max((a - b).abs().max().item() for a, b in zip(reference[1], momenta)),
        }
        del optimizer, clones, momenta
    required = [checks.get(f"fused_vs_{name}") for name in ("lion_foreach", "lion_pytorch")]
    checks["passed"] = all(isinstance(c, dict) and c["params_bit_identical"] and c["momenta_bit_identical"]
                           for c in required)
    checks["passed_means"] = ("fused Lion bit-identical (params and momenta) to foreach Lion and lion_pytorch.Lion "
                              f"after {steps} steps")
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Bandwidth and compile time


def reference_bandwidth(numel: int, repeats: int) -> dict:
    """Two reference kernels on fp32 tensors of ``numel`` elements, interleaved, ``repeats`` calls each.

    * ``copy``: ``dst.copy_(src)``, counted as 2 × bytes / time (the machine's copy bandwidth);
    * ``inplace_add``: ``dst.add_(src)``, counted as 3 × bytes / time. An in-place update writes lines it has just
      read, while a copy's destination lines are read into the cache before being overwritten (write-allocate),
      so a copy moves ~3 × bytes for the 2 × counted, and in-place kernels such as the optimizers' can exceed it.
    """
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)  # touch every page first
    seconds = {"copy": [], "inplace_add": []}
    kernels = {"copy": lambda: dst.copy_(src), "inplace_add": lambda: dst.add_(src)}
    for _ in range(repeats):
        for name, kernel in kernels.items():
            start = time.perf_counter()
            kernel()
            seconds[name].append(time.perf_counter() - start)
    counted = {"copy": 2, "inplace_add": 3}
    return {name: {"seconds": values, "median_seconds": statistics.median(values),
                   "counted_bytes": counted[name] * numel * BYTES_PER_ELEMENT,
                   "bytes_per_second": counted[name] * numel * BYTES_PER_ELEMENT / statistics.median(values)}
            for name, values in seconds.items()} | {"numel": numel}


def _pooled_bandwidth(runs: list[dict], name: str) -> float:
    """Counted bytes / median over every run's calls of the reference kernel ``name``."""
    median = statistics.median(s for run in runs for s in run[name]["seconds"])
    return runs[0][name]["counted_bytes"] / median


_COMPILE_PROBE = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from hf_ext.ops.lion import lion_update_fused
n = 1 << 20
param, grad, momentum = torch.randn(n), torch.randn(n), torch.zeros(n)
seconds = []
for _ in range(3):
    start = time.perf_counter()
    lion_update_fused([param], [grad], [momentum], 1e-4, 0.9, 0.99, 0.1)
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def cold_compile(threads: int) -> dict:
    """First-call times of the fused kernel in two fresh processes that share a new, empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="hf_ext_lion_inductor_") as cache:
        environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        runs = {}
        for label in ("empty_cache", "filled_cache"):
            start = time.perf_counter()
            completed = subprocess.run([sys.executable, "-c", _COMPILE_PROBE, str(threads)], env=environment,
                                       capture_output=True, text=True, timeout=600)
            wall = time.perf_counter() - start
            if completed.returncode != 0:
                return {"error": completed.stderr[-2000:]}
            seconds = json.loads(completed.stdout.strip().splitlines()[-1])
            runs[label] = {"first_call_seconds": seconds[0], "later_call_seconds": seconds[1:],
                           "compile_seconds": seconds[0] - min(seconds[1:]), "process_wall_seconds": wall}
    runs["method"] = ("lion_update_fused on one 2^20-element tensor in a fresh Python process with "
                      "TORCHINDUCTOR_CACHE_DIR set to a new temporary directory; compile_seconds = first call - "
                      "fastest later call; the second process reuses the directory the first one filled")
    return runs


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def _setup_threads() -> int:
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(DEFAULT_THREADS)
    return configure_threads()


def main(quick: bool = False) -> dict:
    started = time.perf_counter()
    settings = copy.deepcopy(QUICK if quick else FULL)
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
    print(f"{numel:,} parameters in {len(params)} tensors, {threads} threads")

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
    print(f"checks: passed={checks['passed']}; " + ", ".join(
        f"{k}: {v['params_bit_identical']}/{v['momenta_bit_identical']}" for k, v in checks.items()
        if isinstance(v, dict) and "params_bit_identical" in v))
    if not checks["passed"]:
        print("WARNING: the fused Lion does not reproduce foreach Lion / lion_pytorch bit for bit (see checks)")
    compile_info = {"first_step_seconds": first_step,
                    "note": "first step of each of our kernels in this process, on the full parameter set: momentum "
                            "allocation, plus for the fused kernel its compilation or the load from torch's cache"}
    if settings["cold_compile"]:
        section_start = time.perf_counter()
        compile_info["cold_compile"] = cold_compile(threads)
        sections["cold_compile"] = time.perf_counter() - section_start
        print(f"cold compile: {compile_info['cold_compile']}")

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
            print(f"{metric_name}: {row['candidate_median_seconds'] * 1e3:.1f} ms vs "
                  f"{row['peer_median_seconds'] * 1e3:.1f} ms, speed_ratio {row['speed_ratio']:.3f}"
                  + (f" (goal >= {goal})" if goal else ""))
        for name in (candidate, peer):
            remaining.remove(name)
            if name not in remaining:
                optimizers.pop(name, None)
    references.append(reference_bandwidth(numel, settings["copy_repeats"]))
    sections["timing"] = time.perf_counter() - section_start

    # 3. State bytes and bandwidth.
    bandwidth = {name: _pooled_bandwidth(references, name) for name in ("copy", "inplace_add")}
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
        metrics["lion_fused_bandwidth_vs_copy"] = {
            "description": "achieved bandwidth of the fused Lion step (5 x 4 B x parameters / median step time) vs "
                           "the machine's copy bandwidth (dst.copy_(src), 2 x bytes / time, same total size)",
            "unit": "GB/s", "candidate": achieved / 1e9, "peer": copy_bandwidth_bytes / 1e9,
            "speed_ratio": achieved / copy_bandwidth_bytes,
            "ratio_definition": "achieved / copy bandwidth (fraction of the machine's copy bandwidth)",
            "goal": None, "min_speed_ratio": None, "passed": None,
        }

    tables = {"optimizers": table, "reference_bandwidth": {
        "runs": references, "copy_bytes_per_second": bandwidth["copy"],
        "inplace_add_bytes_per_second": bandwidth["inplace_add"],
        "method": "dst.copy_(src): 2 x bytes / time; dst.add_(src): 3 x bytes / time; median over the calls "
                  "before and after the timing, fp32 tensors of the parameter count"},
        "compile": compile_info, "sections_seconds": sections, "total_seconds": time.perf_counter() - started}
    result = make_result(NAME, candidate="hf_ext Lion(fused=True) (foreach=True in the lion_foreach rows)",
                         peer="torch AdamW(fused=True) and the other optimizers named per metric",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["tables"] = tables
    shapes = ("SmolLM2-135M's shapes" if model == SMOLLM2_135M else
              f"quick: {model['num_hidden_layers']} layer(s), vocab {model['vocab_size']}, "
              f"hidden {model['hidden_size']}")
    result["markdown_tables"] = [markdown_table(numel, table, bandwidth, compile_info, threads, shapes)]
    path = save_result(result, BENCH_DIR)
    print(result["markdown_tables"][0])
    print(f"total {tables['total_seconds']:.0f} s; results in {path}")
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
    if "empty_cache" in cold:
        line += (f"; fused kernel compile in a fresh process: {cold['empty_cache']['compile_seconds']:.1f} s with an "
                 f"empty inductor cache, {cold['filled_cache']['compile_seconds']:.1f} s with it filled")
    rows += ["", line + "."]
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
