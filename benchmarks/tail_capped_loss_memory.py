"""Tail-capped (TaiLr) loss at a 49,152-word vocabulary: peak memory and time of hf_ext's fused, chunked path vs the
naive TaiLr computation and vs transformers' default cross-entropy path (CPU).

One measured call: the loss's forward and backward w.r.t. hidden states [N, 576] and the lm_head weight [49152, 576],
for N = 2048 … 16384 tokens, fp32 (bf16 rows informational). Methods: ``fused`` (the candidate, chunk 1024),
``fused_chunk256``, ``naive`` (full logits, two softmaxes; the memory peer), ``transformers_ce`` (full logits and
``ForCausalLMLoss``; the time peer).

Goals in fp32 at every N: fused peak <= 0.3x naive (``memory_ratio = naive peak / fused peak >= 1/0.3``) and fused
time <= 1.3x transformers' CE (``speed_ratio = CE time / fused time >= 1/1.3``). ``checks``: the three agree in loss
and gradients to 1e-5 (relative) at a small N. Full-logit methods are skipped where their estimated peak does not fit
in the memory available (``skipped``). A markdown table per dtype gives seconds / peak MiB per method and N.

Run with ``python -m benchmarks.tail_capped_loss_memory`` (15-20 minutes on 2 cores) or ``--quick`` (seconds).
"""

import statistics
import time
from functools import partial

import torch

from .harness import (compare, compare_peak_memory, configure_threads, log, main, make_result, memory_ratio,
                      peak_memory_growth, save_result)
from .tasks.loss_peers import (CANDIDATE_CHUNK, GAMMA, HIDDEN_SIZE, METHODS, OTHER_CHUNK, available_memory_bytes,
                               check_agreement, estimated_peak_bytes, loss_functions, make_inputs)

NAME = "tail_capped_loss_memory"
MEMORY_GOAL = 1 / 0.3  # fused peak <= 0.3 x naive peak
TIME_GOAL = 1 / 1.3  # fused time <= 1.3 x transformers' cross-entropy
SAFETY = 1.3  # a method runs only if its estimated peak x SAFETY fits in MemAvailable


def _schedule(rounds: int, warmup: int, memory: int, chunk_rounds: int) -> dict:
    return {"rounds": rounds, "warmup": warmup, "memory_repeats": memory, "chunk_rounds": chunk_rounds}


# Per token count: interleaved rounds per timed pair, warm-up calls per side, memory calls per side, rounds of the
# chunk-256 row (timed only where a 1024-token chunk is a large share of N; its memory is measured at every N).
# Long calls (~30 s at 16k fp32) vary little: few rounds, no warm-up.
FULL = {
    "vocab_size": 49152, "check_tokens": 512, "dtypes": ["float32", "bfloat16"],
    "tokens": {2048: _schedule(3, 1, 2, 3), 4096: _schedule(3, 0, 1, 2), 8192: _schedule(2, 0, 1, 0),
               16384: _schedule(2, 0, 1, 0)},
}
QUICK = {
    "vocab_size": 4096, "check_tokens": 256, "dtypes": ["float32", "bfloat16"],
    "tokens": {256: _schedule(2, 1, 1, 1)},
}


def forward_backward(loss_fn, hidden, weight, targets) -> None:
    """One measured call: the loss and its gradients w.r.t. hidden and weight (dropped on return)."""
    loss = loss_fn(hidden, weight, targets)
    torch.autograd.grad(loss, (hidden, weight))



def run(settings: dict, quick: bool = False) -> dict:
    started = time.perf_counter()
    threads = configure_threads()
    vocab = settings["vocab_size"]
    schedule = settings.pop("tokens")
    token_counts = sorted(schedule)
    dtypes = [getattr(torch, name) for name in settings["dtypes"]]
    available = available_memory_bytes()
    budget = None if available is None else int(available / SAFETY)
    settings.update({
        "hidden_size": HIDDEN_SIZE, "gamma": GAMMA, "min_weight": 0.0, "candidate_chunk_size": CANDIDATE_CHUNK,
        "other_chunk_size": OTHER_CHUNK, "threads": threads, "device": "cpu",
        "tokens": {str(n): plan for n, plan in schedule.items()},
        "call": "forward + torch.autograd.grad(loss, (hidden, weight)); hidden and weight require grad",
        "goals_apply_to": "float32 rows; bfloat16 rows are informational",
        "memory_available_at_start_bytes": available, "memory_budget_bytes": budget,
        "memory_budget": f"a method runs at N tokens only if estimated_peak_bytes <= MemAvailable / {SAFETY}",
    })
    checks = check_agreement(settings["check_tokens"], vocab)
    log(f"checks: passed={checks['passed']} " + ", ".join(
        f"{k}: {v['grad_weight_relative_difference']:.1e}" for k, v in checks.items() if isinstance(v, dict)))
    if not checks["passed"]:
        log("WARNING: the fused loss does not agree with the naive TaiLr / transformers' CE (see checks)")

    metrics, skipped, sections = {}, {}, {}
    functions = loss_functions()
    runs = [(dtype, tokens) for dtype in dtypes for tokens in token_counts]

    def runnable(method, dtype, tokens) -> bool:
        need = estimated_peak_bytes(method, tokens, vocab, dtype)
        if budget is not None and need > budget:
            skipped[f"{_dtype_name(dtype)}_{tokens}_{method}"] = (
                f"skipped: would need ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available at start "
                f"(budget {budget / 2**30:.1f} GiB)")
            return False
        return True

    # 1. Timing, every dtype and token count.
    for dtype, tokens in runs:
        section_start = time.perf_counter()
        plan, label = schedule[tokens], f"{_dtype_name(dtype)}_{tokens}"
        hidden, weight, targets = make_inputs(tokens, vocab, dtype)
        call = {m: partial(forward_backward, functions[m], hidden, weight, targets) for m in METHODS}
        goals = dtype == torch.float32
        base = {"work": tokens, "unit": "tokens/s", "warmup": plan["warmup"]}
        what = f"{tokens} tokens, vocab {vocab}, {_dtype_name(dtype)}, forward + backward"
        if runnable("transformers_ce", dtype, tokens):
            metrics[f"{label}_fused_vs_transformers_ce"] = compare(
                call["fused"], call["transformers_ce"], repeats=plan["rounds"],
                min_speed_ratio=TIME_GOAL if goals else None,
                description=f"{what}: fused TaiLr (chunk {CANDIDATE_CHUNK}) vs transformers ForCausalLMLoss", **base)
        if runnable("naive", dtype, tokens):
            metrics[f"{label}_fused_vs_naive_time"] = compare(
                call["fused"], call["naive"], repeats=plan["rounds"],
                description=f"{what}: fused TaiLr (chunk {CANDIDATE_CHUNK}) vs naive TaiLr (full logits, two "
                            "softmaxes)", **base)
        if runnable("transformers_ce", dtype, tokens) and plan["chunk_rounds"]:
            metrics[f"{label}_fused_chunk{OTHER_CHUNK}_vs_transformers_ce"] = compare(
                call[f"fused_chunk{OTHER_CHUNK}"], call["transformers_ce"], repeats=plan["chunk_rounds"],
                description=f"{what}: fused TaiLr (chunk {OTHER_CHUNK}) vs transformers ForCausalLMLoss", **base)
        sections[f"{label}_timing"] = time.perf_counter() - section_start
        log(_time_line(label, metrics))
        del hidden, weight, targets, call

    # 2. Peak memory, after all timing (compare_peak_memory fixes glibc's mmap threshold for the process).
    peaks = {}
    for dtype, tokens in runs:
        section_start = time.perf_counter()
        plan, label = schedule[tokens], f"{_dtype_name(dtype)}_{tokens}"
        hidden, weight, targets = make_inputs(tokens, vocab, dtype)
        call = {m: partial(forward_backward, functions[m], hidden, weight, targets) for m in METHODS}
        repeats = plan["memory_repeats"]
        row = peaks[label] = {}
        if runnable("naive", dtype, tokens):
            record = compare_peak_memory(call["fused"], call["naive"], repeats=repeats,
                                         description=f"{label} fused vs naive")
            row["fused"], row["naive"] = record["candidate_peak_bytes_samples"], record["peer_peak_bytes_samples"]
        else:
            row["fused"] = [peak_memory_growth(call["fused"]) for _ in range(repeats)]
        for method in ("transformers_ce", f"fused_chunk{OTHER_CHUNK}"):
            if runnable(method, dtype, tokens):
                row[method] = [peak_memory_growth(call[method]) for _ in range(repeats)]
        sections[f"{label}_memory"] = time.perf_counter() - section_start
        _add_memory_metrics(metrics, label, tokens, vocab, dtype, row)
        log(_memory_line(label, row))
        del hidden, weight, targets, call

    tables = _tables(runs, metrics, peaks, skipped)
    tables["sections_seconds"] = sections
    tables["total_seconds"] = time.perf_counter() - started
    result = make_result(
        NAME,
        candidate=f"hf_ext fused_linear_tail_capped_loss (chunk {CANDIDATE_CHUNK}; chunk {OTHER_CHUNK} where named)",
        peer="naive TaiLr (full logits, two softmaxes) or transformers ForCausalLMLoss (per metric)",
        settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["tables"] = tables
    result["skipped"] = skipped
    result["markdown_tables"] = [_markdown_table(tables, dtype, vocab) for dtype in settings["dtypes"]]
    save_result(result)
    for table in result["markdown_tables"]:
        log(table)
    for key, reason in skipped.items():
        log(f"{key}: {reason}")
    log(f"total {tables['total_seconds']:.0f} s")
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _median(values: list[int]) -> int:
    return int(statistics.median(values))


def _add_memory_metrics(metrics: dict, label: str, tokens: int, vocab: int, dtype: torch.dtype, row: dict) -> None:
    """Peak-memory rows (fused vs naive: the goal in fp32; vs CE and chunk 256: informational), and the peaks merged
    into the time rows of the same pair."""
    fused = _median(row["fused"])
    goals = dtype == torch.float32
    pairs = [("naive", "naive TaiLr (full logits, two softmaxes)", MEMORY_GOAL if goals else None),
             ("transformers_ce", "transformers ForCausalLMLoss", None)]
    for peer, peer_label, goal in pairs:
        if peer not in row:
            continue
        peer_bytes = _median(row[peer])
        ratio = memory_ratio(fused, peer_bytes)
        metrics[f"{label}_peak_memory_fused_vs_{peer}"] = {
            "description": f"peak RSS growth of one forward + backward, {tokens} tokens, vocab {vocab}, "
                           f"{_dtype_name(dtype)}: fused TaiLr (chunk {CANDIDATE_CHUNK}) vs {peer_label}",
            "unit": "MiB", "candidate": fused / 2**20, "peer": peer_bytes / 2**20,
            "candidate_peak_bytes": fused, "peer_peak_bytes": peer_bytes,
            "candidate_peak_bytes_samples": row["fused"], "peer_peak_bytes_samples": row[peer],
            "memory_ratio": ratio,
            # RESULTS.md renders speed_ratio as the ratio column; here it is the memory ratio.
            "speed_ratio": ratio,
            "ratio_definition": "memory_ratio = peer peak / fused peak; > 1 means fused needs less memory",
            "goal": None if goal is None else f"memory_ratio >= {goal:.3f} (fused <= 0.3x the naive peak)",
            "min_memory_ratio": goal, "min_speed_ratio": None,
            "passed": None if goal is None or ratio is None else bool(ratio >= goal),
        }
    merges = [("fused_vs_transformers_ce", "fused", "transformers_ce"), ("fused_vs_naive_time", "fused", "naive"),
              (f"fused_chunk{OTHER_CHUNK}_vs_transformers_ce", f"fused_chunk{OTHER_CHUNK}", "transformers_ce")]
    for suffix, candidate, peer in merges:
        record = metrics.get(f"{label}_{suffix}")
        if record is not None and candidate in row and peer in row:
            record.update({"candidate_peak_bytes": _median(row[candidate]), "peer_peak_bytes": _median(row[peer]),
                           "memory_ratio": memory_ratio(_median(row[candidate]), _median(row[peer]))})


def _tables(runs, metrics: dict, peaks: dict, skipped: dict) -> dict:
    """Per dtype and token count: median seconds and peak bytes per method (None where skipped)."""
    tables = {}
    for dtype, tokens in runs:
        label = f"{_dtype_name(dtype)}_{tokens}"
        seconds = {}
        for suffix, candidate, peer in (("fused_vs_transformers_ce", "fused", "transformers_ce"),
                                        ("fused_vs_naive_time", "fused", "naive"),
                                        (f"fused_chunk{OTHER_CHUNK}_vs_transformers_ce", f"fused_chunk{OTHER_CHUNK}",
                                         "transformers_ce")):
            record = metrics.get(f"{label}_{suffix}")
            if record is not None:
                seconds.setdefault(candidate, []).extend(record["candidate_seconds"])
                seconds.setdefault(peer, []).extend(record["peer_seconds"])
        tables.setdefault(_dtype_name(dtype), {})[str(tokens)] = {
            method: {
                "median_seconds": statistics.median(seconds[method]) if seconds.get(method) else None,
                "peak_bytes": _median(peaks[label][method]) if method in peaks.get(label, {}) else None,
                "skipped": skipped.get(f"{label}_{method}"),
            } for method in METHODS
        }
    return tables


def _markdown_table(tables: dict, dtype_name: str, vocab: int) -> str:
    """Seconds and peak MiB per token count and method, with the two goal ratios, for benchmarks/RESULTS.md."""
    names = {"fused": f"fused (chunk {CANDIDATE_CHUNK})", f"fused_chunk{OTHER_CHUNK}": f"fused (chunk {OTHER_CHUNK})",
             "naive": "naive TaiLr", "transformers_ce": "transformers CE"}
    goal_note = ("goals: fused peak <= 0.3x naive, fused time <= 1.3x transformers CE" if dtype_name == "float32"
                 else "informational")
    rows = [f"{dtype_name}, vocab {vocab}, hidden {HIDDEN_SIZE}: one forward + backward, median seconds / peak RSS "
            f"growth in MiB ({goal_note}).", "",
            "| tokens | " + " | ".join(names.values()) + " | fused / naive peak | fused / CE time |",
            "|---|" + "---|" * (len(names) + 2)]
    for tokens, entry in tables.get(dtype_name, {}).items():
        cells = []
        for method in names:
            seconds, peak = entry[method]["median_seconds"], entry[method]["peak_bytes"]
            if entry[method]["skipped"]:
                cells.append(entry[method]["skipped"].split(",")[0])
            else:
                cells.append(f"{'—' if seconds is None else f'{seconds:.2f} s'} / "
                             f"{'—' if peak is None else f'{peak / 2**20:.0f} MiB'}")
        fused, naive, ce = entry["fused"], entry["naive"], entry["transformers_ce"]
        peak_share = (f"{fused['peak_bytes'] / naive['peak_bytes']:.2f}" if fused["peak_bytes"] and naive["peak_bytes"]
                      else "—")
        time_share = (f"{fused['median_seconds'] / ce['median_seconds']:.2f}"
                      if fused["median_seconds"] and ce["median_seconds"] else "—")
        rows.append(f"| {tokens} | " + " | ".join(cells) + f" | {peak_share} | {time_share} |")
    return "\n".join(rows)


def _time_line(label: str, metrics: dict) -> str:
    parts = [label]
    for suffix in ("fused_vs_transformers_ce", "fused_vs_naive_time", f"fused_chunk{OTHER_CHUNK}_vs_transformers_ce"):
        record = metrics.get(f"{label}_{suffix}")
        if record:
            parts.append(f"{suffix}: {record['candidate_median_seconds']:.2f} s vs {record['peer_median_seconds']:.2f} "
                         f"s (speed_ratio {record['speed_ratio']:.3f})")
    return "; ".join(parts)


def _memory_line(label: str, row: dict) -> str:
    return f"{label} peak MiB: " + ", ".join(f"{m} {_median(v) / 2**20:.0f}" for m, v in row.items())


if __name__ == "__main__":
    main()
