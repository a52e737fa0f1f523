"""Tail-capped (TaiLr) loss at a 49,152-word vocabulary: peak memory and time of hf_ext's fused, chunked path vs the
naive TaiLr computation and vs transformers' default cross-entropy path (CPU).

One measured call is the loss's forward *and* backward with respect to the hidden states [N, 576] and the output
projection (lm_head) weight [49152, 576], both ``requires_grad`` (``torch.autograd.grad``; the gradients are dropped
when the call returns, so no call inherits another's). SmolLM2-135M's head shape; N ∈ {2048, 4096, 8192, 16384}
tokens; fp32, and bf16 hidden states and weight as an informational second pass (bf16 matrix products are about 3×
faster than fp32 ones on CPUs with AVX512-BF16, so it costs little).

================================  ================================================================================
method                            what it computes
================================  ================================================================================
fused (ours, the candidate)       ``hf_ext.ops.tail_capped.fused_linear_tail_capped_loss(hidden, weight, targets,
                                  gamma=0.1)`` with its default ``chunk_size=1024``: the logits exist one chunk of
                                  tokens at a time, one softmax per chunk, gradients accumulated in the forward
fused, chunk 256 (informational)  the same with ``chunk_size=256``
naive TaiLr (memory peer)         the fairseq-criterion way: full logits = hidden @ weight.T,
                                  ``lprobs = log_softmax(logits.float())``, ``probs = softmax(logits.float())`` (the
                                  second softmax), w = clamp(p / (γ + (1 − γ)·p), 0, 1) detached,
                                  loss = −mean(w · lprobs[target])
transformers CE (time peer)       ``logits = F.linear(hidden, weight)``, then
                                  ``transformers.loss.loss_utils.ForCausalLMLoss(logits, None, vocab_size=49152,
                                  shift_labels=targets)``: plain cross-entropy, what a model's default loss costs
================================  ================================================================================

Goals (the issue), checked in fp32 at every N: the fused path's peak memory ≤ 0.3× the naive one's
(``memory_ratio = naive peak / fused peak >= 1/0.3``), and its time ≤ 1.3× transformers' cross-entropy
(``speed_ratio = CE time / fused time >= 1/1.3``). The other rows (time vs naive, memory vs CE, chunk 256, bf16)
are informational.

What to expect of the memory rows: the full-logit paths grow with N (measured: 12 B per logit in fp32 for both the
naive TaiLr and transformers' CE, whose peaks coincide because each holds three N × V fp32 tensors at its worst
moment; 14 B for the naive path in bf16), while the fused path's peak is flat in N: a few [chunk, V] fp32 blocks
plus the fp32 weight gradient (measured ≈ 690 MiB at chunk 1024, ≈ 260-300 MiB at chunk 256). At 2048 tokens a
1024-token chunk is half of all the logits, so the 0.3× goal there depends on the chunk size.

Before timing, ``checks`` verifies at N = 512 (quick: the quick size), fp32, that the three agree: fused vs naive
at γ = 0.1 and, at γ = 0, fused vs transformers' CE, in loss and in both gradients (max |difference| / max |reference|
≤ 1e-5). Half of the check's targets are the argmax token (p near 1, weight near 1) and half random (p small,
weight small), so the weights span the clamp's range; the timed runs use random targets (the values do not change
the work).

Timing is `hf_ext.benchmarking.compare` (interleaved rounds, speed_ratio = peer time / fused time, > 1: fused is
faster); memory (after all timing, it changes the allocator's settings for the rest of the process) is the peak RSS
growth of one call: `compare_peak_memory` for fused vs naive, `peak_memory_growth` for the other methods. The full
logits of the naive and CE paths take 4 B × N × 49152 (3 GiB at 16k) several times over, so each is only run where
its estimated peak (`estimated_peak_bytes`, ~12-14 B per logit, measured) fits in the memory available when the
benchmark starts, with a safety margin; otherwise the row records "skipped: would need X GiB" instead of crashing.

Results: ``benchmarks/results/tail_capped_loss_memory.json`` and a table per dtype in ``benchmarks/RESULTS.md``.
Run with ``hf-ext bench tail_capped_loss_memory`` (about 15-20 minutes on an idle 2-core machine, most of it the
fp32 matrix products at 8k and 16k tokens; 29 minutes were measured while another job kept one core busy) or
``--quick`` (seconds: N = 256, vocabulary 4096); ``HF_EXT_BENCH_THREADS=N`` fixes torch's thread count.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_ext.benchmarking import (
    compare,
    compare_peak_memory,
    configure_threads,
    make_result,
    memory_ratio,
    peak_memory_growth,
    save_result,
)
from hf_ext.ops.tail_capped import fused_linear_tail_capped_loss

NAME = "tail_capped_loss_memory"
BENCH_DIR = Path(__file__).resolve().parent
GAMMA = 0.1
MEMORY_GOAL = 1 / 0.3  # fused peak <= 0.3 x naive peak
TIME_GOAL = 1 / 1.3  # fused time <= 1.3 x transformers' cross-entropy
GRAD_TOLERANCE = 1e-5  # relative: max |a - b| / max |b|
HIDDEN_SIZE = 576
CANDIDATE_CHUNK = 1024  # fused_linear_tail_capped_loss's default
OTHER_CHUNK = 256
METHODS = ("fused", f"fused_chunk{OTHER_CHUNK}", "naive", "transformers_ce")
# Peak bytes per logit (N x V) of the full-logit paths, measured at 2048 tokens: fp32 12 (logits, log-softmax
# output, its gradient), bf16 14 (plus the bf16 logits). Runs need the estimate x SAFETY to fit in MemAvailable.
BYTES_PER_LOGIT = {torch.float32: 12, torch.bfloat16: 14}
SAFETY = 1.3


def _schedule(rounds: int, warmup: int, memory: int, chunk_rounds: int) -> dict:
    return {"rounds": rounds, "warmup": warmup, "memory_repeats": memory, "chunk_rounds": chunk_rounds}


# Per token count: interleaved rounds per timed pair, warm-up calls per side, memory calls per side, rounds of the
# chunk-256 row (timed only where a 1024-token chunk is a large share of N; its memory is measured at every N).
# A call at 16k fp32 takes ~30 s (three 16384 x 49152 x 576 matrix products at ~90 GFLOP/s), and its spread
# between rounds is small next to its length, so long calls get few rounds and no warm-up (everything is warm from
# the shorter ones); memory is stable to a few percent once the mmap threshold is fixed.
FULL = {
    "vocab_size": 49152, "check_tokens": 512, "dtypes": ["float32", "bfloat16"],
    "tokens": {2048: _schedule(3, 1, 2, 3), 4096: _schedule(3, 0, 1, 2), 8192: _schedule(2, 0, 1, 0),
               16384: _schedule(2, 0, 1, 0)},
}
QUICK = {
    "vocab_size": 4096, "check_tokens": 256, "dtypes": ["float32", "bfloat16"],
    "tokens": {256: _schedule(2, 1, 1, 1)},
}


# ---------------------------------------------------------------------------------------------------------------
# The methods


def naive_tailr_loss(hidden, weight, targets, gamma: float = GAMMA) -> torch.Tensor:
    """TaiLr as the fairseq criterion computes it: full logits, log-softmax for the loss, a second softmax for p."""
    logits = hidden @ weight.T
    lprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    p = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    weights = (p / (gamma + (1 - gamma) * p)).clamp(min=0.0, max=1.0).detach()
    return -(weights * lprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).mean()


def transformers_ce_loss(hidden, weight, targets) -> torch.Tensor:
    """transformers' default causal-LM loss on full logits (targets already shifted: every row is a target)."""
    logits = F.linear(hidden, weight)
    return ForCausalLMLoss(logits, None, vocab_size=weight.shape[0], shift_labels=targets)


def fused_loss(hidden, weight, targets, gamma: float = GAMMA, chunk_size: int = CANDIDATE_CHUNK) -> torch.Tensor:
    return fused_linear_tail_capped_loss(hidden, weight, targets, gamma=gamma, chunk_size=chunk_size)


def loss_functions(gamma: float = GAMMA) -> dict:
    return {
        "fused": partial(fused_loss, gamma=gamma, chunk_size=CANDIDATE_CHUNK),
        f"fused_chunk{OTHER_CHUNK}": partial(fused_loss, gamma=gamma, chunk_size=OTHER_CHUNK),
        "naive": partial(naive_tailr_loss, gamma=gamma),
        "transformers_ce": transformers_ce_loss,
    }


def forward_backward(loss_fn, hidden, weight, targets) -> None:
    """One measured call: the loss and its gradients w.r.t. hidden and weight (dropped on return)."""
    loss = loss_fn(hidden, weight, targets)
    torch.autograd.grad(loss, (hidden, weight))


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """hidden [tokens, 576] ~ N(0, 1), weight [vocab, 576] ~ N(0, 0.02²) (both requiring grad), random targets."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN_SIZE, generator=generator).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, HIDDEN_SIZE, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=generator)
    return hidden, weight, targets


# ---------------------------------------------------------------------------------------------------------------
# Validity


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _loss_and_grads(loss_fn, hidden, weight, targets):
    loss = loss_fn(hidden, weight, targets)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def check_agreement(tokens: int, vocab: int, seed: int = 1) -> dict:
    """fused vs naive at γ = 0.1, fused at γ = 0 vs transformers' CE: relative loss and gradient differences, fp32."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN_SIZE, generator=generator).requires_grad_()
    weight = (0.2 * torch.randn(vocab, HIDDEN_SIZE, generator=generator)).requires_grad_()  # peaked softmax
    with torch.no_grad():
        targets = (hidden @ weight.T).argmax(-1)
    random_rows = torch.arange(tokens) % 2 == 1
    targets[random_rows] = torch.randint(vocab, (int(random_rows.sum()),), generator=generator)
    chunk = max(1, tokens // 3)  # several chunks, the last one partial
    pairs = {
        "fused_vs_naive_gamma_0.1": (partial(fused_loss, gamma=GAMMA, chunk_size=chunk),
                                     partial(naive_tailr_loss, gamma=GAMMA)),
        "fused_gamma_0_vs_transformers_ce": (partial(fused_loss, gamma=0.0, chunk_size=chunk), transformers_ce_loss),
    }
    checks = {"tokens": tokens, "vocab_size": vocab, "dtype": "float32", "chunk_size": chunk,
              "tolerance": f"max |a - b| / max |b| <= {GRAD_TOLERANCE} for the loss and both gradients"}
    passed = True
    for name, (ours, reference) in pairs.items():
        a, b = _loss_and_grads(ours, hidden, weight, targets), _loss_and_grads(reference, hidden, weight, targets)
        differences = {f"{part}_relative_difference": _relative_difference(x, y)
                       for part, x, y in zip(("loss", "grad_hidden", "grad_weight"), a, b)}
        ok = all(value <= GRAD_TOLERANCE for value in differences.values())
        checks[name] = {"loss": a[0].item(), "reference_loss": b[0].item(), **differences, "passed": ok}
        passed = passed and ok
    with torch.no_grad():  # the spread of TaiLr weights the check covered
        log_p = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)
        p = log_p.exp()
        weights = (p / (GAMMA + (1 - GAMMA) * p)).clamp(0, 1)
    checks["tailr_weight_range"] = [weights.min().item(), weights.max().item()]
    checks["passed"] = passed
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Memory budget


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unreadable)."""
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def estimated_peak_bytes(method: str, tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Rough peak of one call: the full-logit paths hold ~BYTES_PER_LOGIT per logit; fused holds 3 fp32 chunks."""
    weight_grads = 2 * 4 * vocab * HIDDEN_SIZE
    if method in ("naive", "transformers_ce"):
        return BYTES_PER_LOGIT[dtype] * tokens * vocab + weight_grads
    chunk = CANDIDATE_CHUNK if method == "fused" else OTHER_CHUNK
    return 3 * 4 * min(chunk, tokens) * vocab + weight_grads


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def main(quick: bool = False) -> dict:
    started = time.perf_counter()
    settings = copy.deepcopy(QUICK if quick else FULL)
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
    print(f"checks: passed={checks['passed']} " + ", ".join(
        f"{k}: {v['grad_weight_relative_difference']:.1e}" for k, v in checks.items() if isinstance(v, dict)))
    if not checks["passed"]:
        print("WARNING: the fused loss does not agree with the naive TaiLr / transformers' CE (see checks)")

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
        print(_time_line(label, metrics))
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
        print(_memory_line(label, row))
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
    path = save_result(result, BENCH_DIR)
    for table in result["markdown_tables"]:
        print(table)
    for key, reason in skipped.items():
        print(f"{key}: {reason}")
    print(f"total {tables['total_seconds']:.0f} s; results in {path}")
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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
