"""The common runner behind every script in ``benchmarks/`` (``hf-ext bench NAME``).

A benchmark script defines ``main(quick=False)``; inside it, it builds a *candidate* (ours) and a *peer* (the
library implementation it replaces), calls `compare` once per metric, then (after all timing) `compare_peak_memory`,
and hands the records to `make_result` and `save_result`.
`compare` times both in the same process, interleaved, so that drift (thermal throttling, other load, allocator
state) hits both sides alike. Every ratio is oriented so that **> 1 means the candidate is better**:

* ``speed_ratio  = median over rounds of peer_seconds / candidate_seconds`` (> 1: the candidate is faster),
* ``memory_ratio = peer_peak_bytes / candidate_peak_bytes``                (> 1: the candidate needs less memory).

The speed ratio pairs the two calls of each round: on a shared or virtualised machine the speed of the whole machine
can change several-fold for seconds at a time, and the two calls of one round see the same state, while the median
of each side's times may come from different states. The ratio of the two medians is recorded as well
(``ratio_of_medians``), and the throughputs come from each side's median time.

Peak memory is the growth of the process's resident set size (RSS) during a call, above the RSS just before it
(median over a few calls per side). tracemalloc does not see torch's CPU tensors (they are allocated in C++), so we
read the kernel's own high-water mark instead: on Linux we reset it by writing ``5`` to ``/proc/self/clear_refs`` and
read ``VmHWM`` from ``/proc/self/status`` afterwards. Elsewhere a background thread samples RSS with psutil every
millisecond, which can miss a short spike. Before each measurement we run the garbage collector and ask glibc to
hand freed heap memory back (``malloc_trim``). RSS only tracks the live tensors if freed tensors go back to the OS:
with glibc's default, self-adjusting mmap threshold, large blocks end up on the heap, and one and the same forward
pass was measured peaking anywhere between 125 and 190 MB. `compare_peak_memory` therefore fixes the threshold at
128 KiB first, after which repeated measurements in one run agree to within a few percent (the level can still
shift between runs, for both sides alike). That makes large allocations slower (about 30 % on a prefill pass) for
the rest of the process, so memory is measured after all timing.

Results land in ``benchmarks/results/NAME.json`` (``results/quick/`` for ``quick=True`` smoke runs, which never
overwrite the real numbers), and ``benchmarks/RESULTS.md`` is regenerated from every JSON file in ``results/``.
"""

import copy
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

SPEED_RATIO_DEFINITION = (
    "speed_ratio = median over interleaved rounds of (peer seconds / candidate seconds); "
    "> 1 means the candidate is faster"
)
MEMORY_RATIO_DEFINITION = (
    "memory_ratio = peer_peak_bytes / candidate_peak_bytes; > 1 means the candidate uses less memory"
)
MEMORY_METHOD = (
    "median over calls of the peak RSS growth during the call above the RSS just before it, "
    "after gc.collect() and malloc_trim(0), with glibc's mmap threshold fixed at 128 KiB; "
    "Linux: kernel high-water mark (VmHWM after resetting it via /proc/self/clear_refs), "
    "elsewhere: psutil RSS sampled every 1 ms"
)


# ----------------------------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the CPU.
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where and with what the benchmark ran: platform, CPU, threads, library versions, date (UTC)."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "peft": _package_version("peft"),
        "diffusers": _package_version("diffusers"),
        "hf_ext": _package_version("hf-ext"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _machine_summary(machine: dict) -> str:
    """One short line for the RESULTS.md table."""
    return f"{machine.get('cpu', '?')}, {machine.get('torch_threads', '?')} threads, torch {machine.get('torch', '?')}"


# ----------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------

CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux), e.g. VmRSS or VmHWM."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE).group(1))


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next RSS baseline is honest."""
    gc.collect()
    try:  # glibc keeps freed heap pages; returning them makes the next baseline honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        status_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the process's RSS peaked above its level just before ``fn()`` (see the module docstring)."""
    release_free_memory()
    if _can_reset_high_water_mark():
        CLEAR_REFS.write_text("5")  # VmHWM := current RSS
        baseline = status_kib("VmRSS")
        fn()
        return max(0, status_kib("VmHWM") - baseline) * 1024

    import psutil

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak - baseline)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


THREADS_ENVIRONMENT_VARIABLE = "HF_EXT_BENCH_THREADS"


def configure_threads() -> int:
    """Set and return torch's intra-op thread count for a benchmark: ``$HF_EXT_BENCH_THREADS`` or torch's default.

    Call it once, before building the models, so that candidate and peer run with the same count.
    """
    value = os.environ.get(THREADS_ENVIRONMENT_VARIABLE)
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENVIRONMENT_VARIABLE} must be a positive integer, got {value!r}.")
        torch.set_num_threads(int(value))
    return torch.get_num_threads()


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    # Like timeit: no garbage collection inside the timed call, so that a collection triggered by one side's
    # allocations does not land in its time. (A full gc.collect() before every call instead would cost ~0.2 s
    # each with transformers imported; `compare` freezes the long-lived objects once instead.)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        return time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()


def speed_ratio(candidate_seconds: list[float], peer_seconds: list[float]) -> float:
    """Median of the per-round ratios peer time / candidate time: > 1 means the candidate is faster."""
    if len(candidate_seconds) != len(peer_seconds) or not candidate_seconds:
        raise ValueError(
            f"speed_ratio needs one candidate and one peer time per round, got {len(candidate_seconds)} and "
            f"{len(peer_seconds)}."
        )
    return statistics.median(peer / candidate for candidate, peer in zip(candidate_seconds, peer_seconds))


def memory_ratio(candidate_bytes: int, peer_bytes: int) -> float | None:
    """peer bytes / candidate bytes: > 1 means the candidate needs less; None when either side is unmeasurable."""
    if candidate_bytes <= 0 or peer_bytes <= 0:
        return None
    return peer_bytes / candidate_bytes


def compare(
    candidate: Callable[[], object],
    peer: Callable[[], object],
    *,
    work: float,
    unit: str,
    repeats: int = 5,
    warmup: int = 1,
    min_speed_ratio: float | None = None,
    description: str = "",
) -> dict:
    """Time ``candidate()`` against ``peer()`` in this process and return one metric's record.

    Args:
        candidate, peer: zero-argument callables doing the same work (one call = one sample).
        work: units of work per call (e.g. tokens); throughput = work / median seconds, in ``unit``.
        unit: the throughput unit, e.g. ``"tokens/s"``.
        repeats: timed calls per side; the medians are reported.
        warmup: untimed calls per side first (first-call allocations, lazy initialisation, caches).
        min_speed_ratio: the goal, ``speed_ratio >= min_speed_ratio``; None for an informational metric.

    The order alternates every round (A B, B A, A B, …): a plain A B A B sequence still lets B always follow A,
    so a slow-down that a call leaves behind for the next one would fall on one side only.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"compare needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    sides = {"candidate": candidate, "peer": peer}
    times = {"candidate": [], "peer": []}
    label = description or unit
    for _ in tqdm(range(warmup), desc=f"warm-up {label}", leave=False, disable=warmup == 0):
        candidate()
        peer()
    # Collect once, then freeze the survivors (the models, the libraries): collections between timed calls only
    # look at new objects and stay cheap.
    gc.collect()
    gc.freeze()
    try:
        for round_index in tqdm(range(repeats), desc=f"timing {label}", leave=False):
            order = ("candidate", "peer") if round_index % 2 == 0 else ("peer", "candidate")
            for side in order:
                times[side].append(_timed(sides[side]))
    finally:
        gc.unfreeze()

    candidate_median = statistics.median(times["candidate"])
    peer_median = statistics.median(times["peer"])
    ratio = speed_ratio(times["candidate"], times["peer"])
    round_ratios = [peer / candidate for candidate, peer in zip(times["candidate"], times["peer"])]
    record = {
        "description": description,
        "unit": unit,
        "work_per_call": work,
        "candidate": work / candidate_median,
        "peer": work / peer_median,
        "candidate_median_seconds": candidate_median,
        "peer_median_seconds": peer_median,
        "candidate_seconds": times["candidate"],
        "peer_seconds": times["peer"],
        "repeats": repeats,
        "warmup": warmup,
        "speed_ratio": ratio,
        "speed_ratio_range": [min(round_ratios), max(round_ratios)],
        "ratio_of_medians": peer_median / candidate_median,
        "goal": None if min_speed_ratio is None else f"speed_ratio >= {min_speed_ratio}",
        "min_speed_ratio": min_speed_ratio,
        "passed": None if min_speed_ratio is None else bool(ratio >= min_speed_ratio),
    }
    return record


def fix_mmap_threshold() -> None:
    """Make glibc serve every allocation over 128 KiB with mmap and return it to the OS when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # -3 = M_MMAP_THRESHOLD; setting it turns the self-adjustment off
    except (OSError, AttributeError):
        pass


def benchmark_settings(full: dict, quick_settings: dict, quick: bool, overrides: dict) -> dict:
    """A deep copy of the full or quick settings with ``overrides`` applied; unknown override keys are an error."""
    settings = copy.deepcopy(quick_settings if quick else full)
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; known: {sorted(settings)}.")
    settings.update(overrides)
    return settings


def compare_peak_memory(
    candidate: Callable[[], object], peer: Callable[[], object], *, repeats: int = 3, description: str = ""
) -> dict:
    """Peak RSS growth of ``candidate()`` and ``peer()`` (median over ``repeats`` calls each) and their ratio.

    Call it after all timing in the process: it fixes glibc's mmap threshold for the rest of the process (see the
    module docstring), which slows large allocations. Merge the returned record into the metric's `compare` record.
    """
    if repeats < 1:
        raise ValueError(f"compare_peak_memory needs repeats >= 1, got {repeats}.")
    fix_mmap_threshold()
    sides = {"candidate": candidate, "peer": peer}
    peaks = {"candidate": [], "peer": []}
    for _ in tqdm(range(repeats), desc=f"peak memory {description}".strip(), leave=False):
        for side in ("candidate", "peer"):
            peaks[side].append(peak_memory_growth(sides[side]))
    candidate_bytes = int(statistics.median(peaks["candidate"]))
    peer_bytes = int(statistics.median(peaks["peer"]))
    return {
        "candidate_peak_bytes": candidate_bytes,
        "peer_peak_bytes": peer_bytes,
        "candidate_peak_bytes_samples": peaks["candidate"],
        "peer_peak_bytes_samples": peaks["peer"],
        "memory_ratio": memory_ratio(candidate_bytes, peer_bytes),
    }


# ----------------------------------------------------------------------------------------------------------------
# Result files and the RESULTS.md table
# ----------------------------------------------------------------------------------------------------------------


def make_result(
    name: str,
    *,
    candidate: str,
    peer: str,
    settings: dict,
    metrics: dict[str, dict],
    checks: dict | None = None,
    quick: bool = False,
) -> dict:
    """Assemble one benchmark's JSON document from its `compare` records."""
    goals = [m["passed"] for m in metrics.values() if m.get("passed") is not None]
    return {
        "benchmark": name,
        "candidate": candidate,
        "peer": peer,
        "quick": quick,
        "ratio_definitions": {"speed_ratio": SPEED_RATIO_DEFINITION, "memory_ratio": MEMORY_RATIO_DEFINITION},
        "memory_method": MEMORY_METHOD,
        "machine": machine_info(),
        "settings": settings,
        "checks": checks or {},
        "metrics": metrics,
        "passed": all(goals) if goals else None,
    }


def save_result(result: dict, benchmarks_dir: str | os.PathLike) -> Path:
    """Write ``results/NAME.json`` under ``benchmarks_dir`` and regenerate ``RESULTS.md`` there.

    Quick (smoke) runs go to ``results/quick/NAME.json`` and leave the table alone.
    """
    benchmarks_dir = Path(benchmarks_dir)
    results_dir = benchmarks_dir / "results"
    if result.get("quick"):
        results_dir = results_dir / "quick"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['benchmark']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not result.get("quick"):
        write_results_table(benchmarks_dir)
    return path



def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (after saying so) when matplotlib is missing:
    plots are optional extras of a benchmark, never a reason for it to fail."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf-ext[plot]'): no plot written.", flush=True)
        return None
    return plt


def save_figure(figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``figure`` to ``path`` (folders created, tight bounding box), close it and return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path

def _format_number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _ratio_cell(metric: dict) -> str:
    """The ratio and, for ratios that are not speed ratios (e.g. losses), what it means."""
    ratio = metric.get("speed_ratio")
    if ratio is None:
        return "—"
    definition = metric.get("ratio_definition")
    return f"{ratio:.3f}" + (f" ({definition})" if definition else "")


def _pass_cell(passed: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "—"}[passed]


def write_results_table(benchmarks_dir: str | os.PathLike) -> Path:
    """Regenerate ``RESULTS.md``: one row per metric of every ``results/*.json`` (quick runs excluded)."""
    benchmarks_dir = Path(benchmarks_dir)
    lines = [
        "# Benchmark results",
        "",
        "Generated by `hf_ext.benchmarking` from `benchmarks/results/*.json`; do not edit by hand.",
        "Each benchmark measures hf_ext (candidate) against the library implementation it replaces (peer), "
        "in the same process, interleaved.",
        f"Ratio, unless the row says otherwise: {SPEED_RATIO_DEFINITION}.",
        "",
        "| benchmark | metric | candidate | peer | ratio | goal | pass | date | machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for path in sorted((benchmarks_dir / "results").glob("*.json")):
        result = json.loads(path.read_text())
        machine = result.get("machine", {})
        date = machine.get("date", "")[:10]
        for metric_name, metric in result.get("metrics", {}).items():
            unit = metric.get("unit", "")
            lines.append(
                "| "
                + " | ".join(
                    [
                        result["benchmark"],
                        metric_name,
                        f"{result['candidate']}: {_format_number(metric['candidate'])} {unit}",
                        f"{result['peer']}: {_format_number(metric['peer'])} {unit}",
                        _ratio_cell(metric),
                        metric.get("goal") or "—",
                        _pass_cell(metric.get("passed")),
                        date,
                        _machine_summary(machine),
                    ]
                )
                + " |"
            )
        # Benchmarks may add their own tables (markdown) and plots (paths relative to benchmarks/).
        extra = [*result.get("markdown_tables", []), *(f"![{result['benchmark']}]({plot})" for plot in result.get("plots", []))]
        if extra:
            details += ["", f"## {result['benchmark']}"]
            for item in extra:
                details += ["", item]
    table = benchmarks_dir / "RESULTS.md"
    table.write_text("\n".join(lines + details) + "\n")
    return table


# ----------------------------------------------------------------------------------------------------------------
# Finding and running benchmark scripts
# ----------------------------------------------------------------------------------------------------------------


def benchmark_dirs() -> list[Path]:
    """Where benchmark scripts are looked for: ``./benchmarks`` first, then the ``benchmarks/`` of the repository."""
    import hf_ext

    candidates = [Path.cwd() / "benchmarks", Path(hf_ext.__file__).resolve().parents[1] / "benchmarks"]
    found = []
    for directory in candidates:
        if directory.is_dir() and directory.resolve() not in [d.resolve() for d in found]:
            found.append(directory)
    return found


def list_benchmarks() -> list[str]:
    """Names accepted by `run_benchmark` (scripts ``benchmarks/NAME.py`` not starting with an underscore)."""
    names = set()
    for directory in benchmark_dirs():
        names.update(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def load_benchmark(name: str):
    """Import ``benchmarks/NAME.py`` as a module (registered in sys.modules: dataclasses and pickling look it up)."""
    for directory in benchmark_dirs():
        script = directory / f"{name}.py"
        if script.is_file() and not name.startswith("_"):
            break
    else:
        available = ", ".join(list_benchmarks()) or "none"
        searched = ", ".join(str(d) for d in benchmark_dirs()) or "no benchmarks/ directory found"
        raise ValueError(f"Unknown benchmark {name!r}; available: {available} (searched {searched}).")
    module_name = f"hf_ext_benchmark_{name}"
    spec = importlib.util.spec_from_file_location(module_name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"Benchmark script {script} defines no main(quick=False) function.")
    return module


def run_benchmark(name: str, quick: bool = False) -> dict:
    """Import ``benchmarks/NAME.py`` and return what its ``main(quick=quick)`` returns (the result document)."""
    return load_benchmark(name).main(quick=quick)
