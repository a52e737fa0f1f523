"""ReRoPE cost: `hfx_rerope` against plain `sdpa` and against the dense two-matrix algorithm of the reference patch.

A Llama with SmolLM2-135M's attention shapes, 4 layers, random weights, fp32, CPU, batch 1.

1. **Prefill**, one forward pass over L tokens (window w = L/4, log-n on): `hfx_rerope` vs `sdpa` (goal: speed_ratio
   >= 0.67, i.e. at most 1.5x sdpa's time) and vs `bench_dense_rerope`, two full L×L logit matrices (goal >= 2 from
   L = 2048 on; run only where its estimated peak fits 6 GiB). Peak RSS growth per call after all timing; the
   ``memory_growth_fit`` table gives bytes per token and the log-log exponent (1 linear, 2 quadratic).
2. **Decode** `decode_steps` greedy tokens after a `decode_context`-token prompt: Llama `hfx_rerope` vs `sdpa`, HfExt
   `rerope_mode="rerope"` vs `"off"`, and HfExt ReRoPE vs Llama `hfx_rerope` (informational).

speed_ratio = peer time / hfx_rerope time (> 1: hfx_rerope faster). Before timing, the dense reference, hfx_rerope
and the HfExt path must agree to 1e-4 in logits. Setting ``max_length`` cuts the sweep short (``results/partial/``).

Run with ``python -m benchmarks.rerope_speed_memory`` (4-6 minutes on 2 cores) or ``--quick`` (under a minute).
"""

import json
import time

import torch

from .harness import (compare, compare_peak_memory, configure_threads, log, main, make_result, pyplot, results_dir,
                      save_figure, save_result)
from .tasks.rerope_models import (DENSE, MODEL, ROPE_THETA, Decoder, build_models, dense_peak_bytes, set_window,
                                  validate)

NAME = "rerope_speed_memory"
PREFILL_GOAL = 0.67  # hfx_rerope may take at most 1.5x sdpa's time
DENSE_GOAL = 2.0  # and should be at least twice as fast as the dense algorithm it replaces …
DENSE_GOAL_FROM = 2048  # … once attention dominates a forward pass; shorter rows are informational
DENSE_MEMORY_LIMIT = 6 * 2**30  # the machine is shared: never start a dense pass estimated above this


def _schedule(rounds, dense_rounds, warmup, dense_warmup, memory):
    return {"rounds": rounds, "dense_rounds": dense_rounds, "warmup": warmup, "dense_warmup": dense_warmup,
            "memory_repeats": memory}


# Per length, how often each comparison runs: long passes get fewer rounds and no warm-up, the dense ones fewest.
# max_length (None: all) cuts the sweep and the decode context short, for a partial run into results/partial/.
FULL = {
    "lengths": {1024: _schedule(5, 3, 1, 1, 2), 2048: _schedule(5, 3, 1, 1, 2), 4096: _schedule(3, 2, 1, 0, 1),
                8192: _schedule(3, 2, 0, 0, 1), 16384: _schedule(2, 2, 0, 0, 1)},
    "decode_context": 8192, "decode_steps": 16, "decode_repeats": 5,
    "validation_length": 256, "validation_window": 64, "validation_logn_length": 128, "max_length": None,
}
QUICK = {
    "lengths": {256: _schedule(2, 1, 1, 0, 1), 512: _schedule(2, 1, 1, 0, 1)},
    "decode_context": 512, "decode_steps": 4, "decode_repeats": 2,
    "validation_length": 256, "validation_window": 64, "validation_logn_length": 128, "max_length": None,
}


def prefill(model, input_ids):
    return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def fit_growth(lengths: list[int], values: list[float]) -> dict | None:
    """Least-squares lines value = a + b·L and log value = c + e·log L (e: 1 linear, 2 quadratic)."""
    points = [(n, v) for n, v in zip(lengths, values) if v and v > 0]
    if len(points) < 2:
        return None
    x = torch.tensor([float(n) for n, _ in points], dtype=torch.float64)
    y = torch.tensor([float(v) for _, v in points], dtype=torch.float64)
    design = torch.stack((torch.ones_like(x), x), dim=1)
    intercept, slope = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    log_design = torch.stack((torch.ones_like(x), x.log()), dim=1)
    exponent = torch.linalg.lstsq(log_design, y.log()[:, None]).solution.flatten()[1].item()
    residual = y - (intercept + slope * x)
    return {"per_token": slope, "intercept": intercept, "loglog_exponent": exponent,
            "linear_fit_max_relative_error": (residual.abs() / y).max().item(), "lengths": [n for n, _ in points]}


def plot(tables: dict):
    """Prefill time and peak memory against L per method, log-log (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    lengths = tables["lengths"]
    styles = {"hfx_rerope": ("tab:blue", "o"), "sdpa": ("tab:green", "s"), DENSE: ("tab:red", "^")}
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, (color, marker) in styles.items():
        ran = [(n, t, m) for n, t, m in zip(lengths, tables["seconds"][method], tables["peak_bytes"][method])
               if t is not None]
        if ran:
            time_axis.plot([n for n, _, _ in ran], [t for _, t, _ in ran], marker=marker, color=color, label=method)
            memory_axis.plot([n for n, _, _ in ran], [m / 2**20 for _, _, m in ran], marker=marker, color=color,
                             label=method)
    # Where the dense pass was skipped, its estimated need (hollow markers, dashed).
    estimates = [(n, tables["dense_estimated_bytes"][i]) for i, n in enumerate(lengths)]
    memory_axis.plot([n for n, _ in estimates], [b / 2**20 for _, b in estimates], linestyle="--", marker="^",
                     markerfacecolor="none", color="tab:red", alpha=0.6, label=f"{DENSE} (estimate)")
    memory_axis.axhline(DENSE_MEMORY_LIMIT / 2**20, color="gray", linestyle=":", label="dense run limit (6 GiB)")
    for length, estimate in estimates:
        if tables["dense"].get(str(length), "").startswith("skipped"):
            memory_axis.annotate("skipped", (length, estimate / 2**20), textcoords="offset points", xytext=(-20, 6),
                                 fontsize=7, color="tab:red")
    for axis, label in ((time_axis, "prefill time [s]"), (memory_axis, "peak RSS growth [MiB]")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length L (window w = L/4)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")  # the curves rise to the right: that corner stays free
    fig.suptitle("ReRoPE prefill, Llama with SmolLM2-135M attention shapes, 4 layers, fp32 CPU, batch 1")
    fig.tight_layout()
    return fig


def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    max_length = settings["max_length"]
    partial = max_length is not None and not quick
    if max_length is not None:
        settings["lengths"] = {n: s for n, s in settings["lengths"].items() if n <= max_length}
        if not settings["lengths"]:
            raise ValueError(f"max_length={max_length} leaves no length to measure.")
        settings["decode_context"] = min(settings["decode_context"], max_length)
    threads = configure_threads()
    schedule = settings.pop("lengths")
    lengths = sorted(schedule)
    models = build_models()
    heads = MODEL["num_attention_heads"]
    settings.update({
        "model": dict(MODEL, architecture="LlamaForCausalLM", rope_theta=ROPE_THETA),
        "weights": "random (seed 0): speed and memory do not depend on the weight values",
        "dtype": "float32", "device": "cpu", "batch": 1, "threads": threads, "partial": partial,
        "prefill": "one forward pass, use_cache=False, logits_to_keep=1",
        "rerope_window": "L / 4 for the prefill at length L; decode_context / 4 for decode",
        "logn_scaling": "on for hfx_rerope and the dense reference (N = max_position_embeddings = 8192); "
                        "off in the HfExt decode rows",
        "dense_memory_limit_bytes": DENSE_MEMORY_LIMIT,
        "lengths": {str(n): plan for n, plan in schedule.items()},
        "dense_goal": f"speed_ratio >= {DENSE_GOAL} from L = {DENSE_GOAL_FROM} on; informational below",
    })
    metrics, tables = {}, {"lengths": lengths, "dense": {}, "dense_estimated_bytes": []}
    sections = {}

    with torch.inference_mode():
        checks = validate(models, settings["validation_length"], settings["validation_window"],
                          settings["validation_logn_length"])
        log(f"validation: {checks}")

        # 1. Prefill timing. The dense pass runs only where its estimated peak is affordable.
        runnable_dense = {}
        for length in lengths:
            section_start = time.perf_counter()
            plan = schedule[length]
            set_window(models, length // 4)
            ids = torch.randint(MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
            estimate = dense_peak_bytes(length, heads)
            tables["dense_estimated_bytes"].append(estimate)
            runnable_dense[length] = estimate <= DENSE_MEMORY_LIMIT
            if not runnable_dense[length]:
                tables["dense"][str(length)] = f"skipped: would need {estimate / 2**30:.1f} GiB"
            metrics[f"prefill_{length}_vs_sdpa"] = compare(
                lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models["sdpa"], ids),
                work=length, unit="tokens/s", repeats=plan["rounds"], warmup=plan["warmup"],
                min_speed_ratio=PREFILL_GOAL,
                description=f"prefill {length} tokens (w={length // 4}): hfx_rerope vs sdpa")
            if runnable_dense[length]:
                metrics[f"prefill_{length}_vs_dense"] = compare(
                    lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models[DENSE], ids),
                    work=length, unit="tokens/s", repeats=plan["dense_rounds"], warmup=plan["dense_warmup"],
                    min_speed_ratio=DENSE_GOAL if length >= DENSE_GOAL_FROM else None,
                    description=f"prefill {length} tokens (w={length // 4}): hfx_rerope vs dense two-matrix reference")
            sections[f"prefill_{length}_timing"] = time.perf_counter() - section_start
            log(_prefill_line(length, metrics))

        # 2. Decode timing at the long context.
        section_start = time.perf_counter()
        context, steps = settings["decode_context"], settings["decode_steps"]
        set_window(models, context // 4)
        prompt = torch.randint(MODEL["vocab_size"], (1, context), generator=torch.Generator().manual_seed(3))
        decoders = {name: Decoder(models[name], prompt, steps)
                    for name in ("hfx_rerope", "sdpa", "hfext_rerope", "hfext_off")}
        sections["decode_prefills"] = time.perf_counter() - section_start
        decode_timing = {"work": steps, "unit": "tokens/s", "repeats": settings["decode_repeats"], "warmup": 1}
        decode_pairs = {f"decode_{context}_hfx_rerope_vs_sdpa": ("hfx_rerope", "sdpa"),
                        f"decode_{context}_hfext_rerope_vs_hfext_off": ("hfext_rerope", "hfext_off")}
        for metric_name, (candidate, peer) in decode_pairs.items():
            metrics[metric_name] = compare(
                decoders[candidate], decoders[peer],
                description=f"{steps} greedy decode steps after a {context}-token prompt (w={context // 4}): "
                            f"{candidate} vs {peer}", **decode_timing)
        # The two ReRoPE paths against each other (informational): how much the window-only rotation saves.
        metrics[f"decode_{context}_hfext_rerope_vs_hfx_rerope"] = compare(
            decoders["hfext_rerope"], decoders["hfx_rerope"],
            description=f"{steps} decode steps, {context}-token prompt: HfExt rerope_mode='rerope' vs Llama hfx_rerope",
            **decode_timing)
        sections["decode_timing"] = time.perf_counter() - section_start

        # 3. Memory, after all timing (it fixes glibc's mmap threshold for the rest of the process).
        for length in lengths:
            section_start = time.perf_counter()
            memory_repeats = schedule[length]["memory_repeats"]
            set_window(models, length // 4)
            ids = torch.randint(MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
            metrics[f"prefill_{length}_vs_sdpa"].update(compare_peak_memory(
                lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models["sdpa"], ids),
                repeats=memory_repeats, description=f"prefill {length} vs sdpa"))
            if runnable_dense[length]:
                metrics[f"prefill_{length}_vs_dense"].update(compare_peak_memory(
                    lambda: prefill(models["hfx_rerope"], ids), lambda: prefill(models[DENSE], ids),
                    repeats=memory_repeats, description=f"prefill {length} vs dense"))
                tables["dense"][str(length)] = "ran"
            sections[f"prefill_{length}_memory"] = time.perf_counter() - section_start
        set_window(models, context // 4)
        for metric_name, (candidate, peer) in decode_pairs.items():
            metrics[metric_name].update(compare_peak_memory(decoders[candidate], decoders[peer], repeats=2,
                                                            description=metric_name))

    tables.update(_prefill_tables(lengths, metrics, runnable_dense))
    tables["sections_seconds"] = sections
    tables["total_seconds"] = time.perf_counter() - started
    # One candidate/peer label per result file (the harness's layout); the metric name says which pair a row is.
    result = make_result(NAME, candidate="hf_ext ReRoPE (hfx_rerope; HfExt rows: rerope_mode='rerope')",
                         peer="sdpa, dense two-matrix ReRoPE, HfExt rerope_mode=off or hfx_rerope (per metric)",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["partial"] = partial
    result["tables"] = tables
    result["markdown_tables"] = [_markdown_table(lengths, tables)]
    figure = plot(tables)
    if partial:  # save_result would rewrite RESULTS.md with an incomplete run
        directory = results_dir(False) / "partial"
        directory.mkdir(parents=True, exist_ok=True)
        if figure is not None:
            save_figure(figure, directory / f"{NAME}.png")
        path = directory / f"{NAME}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        log(f"partial run: results in {path}")
    else:
        save_result(result, figure)
    _print_summary(tables, metrics)
    return result


def _prefill_line(length: int, metrics: dict) -> str:
    row = metrics[f"prefill_{length}_vs_sdpa"]
    line = (f"L={length}: hfx_rerope {row['candidate_median_seconds']:.3f} s, sdpa {row['peer_median_seconds']:.3f} s, "
            f"speed_ratio {row['speed_ratio']:.3f} (goal >= {PREFILL_GOAL})")
    dense = metrics.get(f"prefill_{length}_vs_dense")
    if dense:
        line += f"; dense {dense['peer_median_seconds']:.3f} s, speed_ratio vs dense {dense['speed_ratio']:.2f}"
    return line


def _prefill_tables(lengths: list[int], metrics: dict, runnable_dense: dict) -> dict:
    """Per method and length: median seconds and peak bytes (None where not run), and the growth fits."""
    seconds = {"hfx_rerope": [], "sdpa": [], DENSE: []}
    peaks = {"hfx_rerope": [], "sdpa": [], DENSE: []}
    for length in lengths:
        row = metrics[f"prefill_{length}_vs_sdpa"]
        seconds["hfx_rerope"].append(row["candidate_median_seconds"])
        seconds["sdpa"].append(row["peer_median_seconds"])
        peaks["hfx_rerope"].append(row["candidate_peak_bytes"])
        peaks["sdpa"].append(row["peer_peak_bytes"])
        dense = metrics.get(f"prefill_{length}_vs_dense") if runnable_dense[length] else None
        seconds[DENSE].append(dense["peer_median_seconds"] if dense else None)
        peaks[DENSE].append(dense["peer_peak_bytes"] if dense else None)
    return {
        "seconds": seconds,
        "peak_bytes": peaks,
        "peak_bytes_per_token": {m: [None if p is None else p / n for p, n in zip(v, lengths)]
                                 for m, v in peaks.items()},
        "memory_growth_fit": {m: fit_growth(lengths, v) for m, v in peaks.items()},
        "time_growth_fit": {m: fit_growth(lengths, v) for m, v in seconds.items()},
    }


def _markdown_table(lengths: list[int], tables: dict) -> str:
    """Prefill seconds and peak memory per length and method, for benchmarks/RESULTS.md."""
    methods = ("hfx_rerope", "sdpa", DENSE)
    rows = ["Prefill of L tokens (batch 1, 4 layers with SmolLM2-135M attention shapes): median seconds / peak RSS "
            "growth in MiB.", "", "| L | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for i, length in enumerate(lengths):
        cells = []
        for method in methods:
            seconds, peak = tables["seconds"][method][i], tables["peak_bytes"][method][i]
            cells.append("skipped" if seconds is None else f"{seconds:.2f} s / {peak / 2**20:.0f} MiB")
        rows.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _print_summary(tables: dict, metrics: dict) -> None:
    for method, fit in tables["memory_growth_fit"].items():
        if fit:
            log(f"peak memory {method}: {fit['per_token'] / 1024:.1f} KiB per token (linear fit), "
                  f"log-log exponent {fit['loglog_exponent']:.2f}")
    for length, status in tables["dense"].items():
        log(f"dense reference at L={length}: {status}")
    for name, row in metrics.items():
        if name.startswith("decode"):
            log(f"{name}: {row['candidate']:.1f} vs {row['peer']:.1f} tokens/s, speed_ratio {row['speed_ratio']:.3f}")
    log(f"total {tables['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
