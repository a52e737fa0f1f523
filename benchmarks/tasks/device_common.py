"""Shared pieces of `benchmarks.device_check`: a section's context (time budget, result rows, per-row guards), timing
and peak memory on CUDA or the CPU, and the error measures of the parity checks."""

import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..harness import compare, log


class BudgetExhausted(BaseException):
    """A section ran out of its time budget. A BaseException, so that libraries' ``except Exception`` (a compiler
    fallback, say) cannot swallow it."""


@dataclass
class Section:
    """What a section function gets: where to run, its settings, its deadline, and the rows it has recorded so far
    (kept when the section fails or runs out of time)."""

    name: str
    device: torch.device
    quick: bool
    settings: dict
    deadline: float  # time.monotonic()
    rows: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def require_time(self, seconds: float, what: str) -> None:
        """Stop the section (the rest is recorded as skipped) if less than ``seconds`` of its budget is left."""
        if self.time_left() < seconds:
            raise BudgetExhausted(f"{what}: needs ~{seconds:.0f} s, {max(0.0, self.time_left()):.0f} s of the "
                                  "section's budget left")

    def add(self, row: dict) -> dict:
        row.setdefault("status", "ok")
        self.rows.append(row)
        log(f"  [{self.name}] {describe_row(row)}")
        return row

    def skip(self, name: str, reason: str, **extra) -> None:
        self.add({"name": name, "status": "skipped", "reason": reason, **extra})

    def guarded(self, name: str, function: Callable[[], dict | None], **extra) -> dict | None:
        """Run one row: ``function()`` returns the row's fields (or None if it added rows itself). An out-of-memory
        error or any other exception becomes a row with status "oom"/"error" and the exception text; the section
        goes on. Running out of the time budget still stops the section."""
        try:
            fields = function()
        except torch.OutOfMemoryError as error:
            free_memory()
            return self.add({"name": name, "status": "oom", "error": _first_line(error), **extra})
        except Exception as error:  # noqa: BLE001 - a failed row is a result, not a crash
            free_memory()
            return self.add({"name": name, "status": "error", "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=12)[-4000:], **extra})
        return None if fields is None else self.add({"name": name, **extra, **fields})


def describe_row(row: dict) -> str:
    """One progress line for a row."""
    parts = [row.get("name", "?"), row["status"]]
    for key in ("dtype", "error_value", "tolerance", "passed", "time_ratio", "memory_ratio", "met", "reason",
                "error"):
        if row.get(key) is not None:
            value = row[key]
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(str(part) for part in parts)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Timing and peak memory


def time_call(function: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on a GPU (the host's launch work included), else perf_counter."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    function()
    return time.perf_counter() - start_time


def time_pair(candidate: Callable[[], object], peer: Callable[[], object], *, repeats: int, warmup: int) -> dict:
    """Both sides in this process, interleaved after ``warmup`` untimed calls each (the harness's `compare`, which
    synchronises CUDA around every call). time_ratio = median over rounds of candidate seconds / peer seconds
    (< 1: the candidate is faster)."""
    record = compare(candidate, peer, work=1.0, unit="calls/s", repeats=repeats, warmup=warmup)
    ratios = [c / p for c, p in zip(record["candidate_seconds"], record["peer_seconds"])]
    return {"candidate_seconds": record["candidate_median_seconds"], "peer_seconds": record["peer_median_seconds"],
            "time_ratio": statistics.median(ratios), "time_ratio_range": [min(ratios), max(ratios)],
            "rounds": repeats, "warmup": warmup}


def peak_bytes(function: Callable[[], object], device: torch.device) -> int | None:
    """Growth of torch's allocated CUDA memory during one call, above what was allocated just before it
    (``max_memory_allocated`` after ``reset_peak_memory_stats``); None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def timed_with_peak(function: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds and peak memory growth (None off CUDA) of one call of ``function``."""
    if device.type != "cuda":
        return time_call(function, device), None
    box = {}
    peak = peak_bytes(lambda: box.setdefault("seconds", time_call(function, device)), device)
    return box["seconds"], peak


def ratio_fields(timing: dict, candidate_peak: int | None, peer_peak: int | None, goal: dict) -> dict:
    """A ratio row's numbers and whether each part of its goal (``max_time_ratio``, ``max_memory_ratio``: limits on
    candidate / peer) is met; ``met`` is None where nothing could be judged (no memory figure on the CPU)."""
    memory_ratio = candidate_peak / peer_peak if candidate_peak is not None and peer_peak else None
    fields = {**timing, "candidate_peak_bytes": candidate_peak, "peer_peak_bytes": peer_peak,
              "memory_ratio": memory_ratio, "goal": goal.get("text")}
    verdicts = []
    if goal.get("max_time_ratio") is not None and timing.get("time_ratio") is not None:
        fields["max_time_ratio"] = goal["max_time_ratio"]
        fields["time_goal_met"] = bool(timing["time_ratio"] <= goal["max_time_ratio"])
        verdicts.append(fields["time_goal_met"])
    if goal.get("max_memory_ratio") is not None:
        fields["max_memory_ratio"] = goal["max_memory_ratio"]
        fields["memory_goal_met"] = None if memory_ratio is None else bool(memory_ratio <= goal["max_memory_ratio"])
        if memory_ratio is not None:
            verdicts.append(fields["memory_goal_met"])
    fields["met"] = all(verdicts) if verdicts else None
    return fields


# ----------------------------------------------------------------------------------------------------------------
# Errors against a reference


def max_relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|, in float64 on the CPU."""
    value, reference = value.detach().cpu().double(), reference.detach().cpu().double()
    return ((value - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


def norm_relative_error(values: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """‖values − references‖ / ‖references‖ over all tensors together (float64, CPU)."""
    difference = sum(((v.detach().cpu().double() - r.detach().cpu().double()) ** 2).sum() for v, r in
                     zip(values, references))
    norm = sum((r.detach().cpu().double() ** 2).sum() for r in references)
    return (difference.sqrt() / norm.sqrt().clamp(min=1e-30)).item()


def parity_row(check: str, dtype: torch.dtype | str, error: float, tolerance: float, **extra) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    return {"check": check, "dtype": dtype_name, "error_value": error, "tolerance": tolerance,
            "passed": bool(error <= tolerance), **extra}


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)
