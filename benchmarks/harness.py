"""The shared harness of every benchmark in this folder: settings, interleaved timing, peak memory, result files,
the RESULTS.md table, plots and the command line.

A benchmark is a module ``benchmarks/NAME.py`` with ``NAME``, two settings dicts ``FULL`` and ``QUICK`` (a smoke run
of seconds) and ``run(settings, quick) -> dict``. Inside ``run`` it builds a *candidate* (ours) and a *peer* (the
library implementation it replaces), calls `compare` once per timed metric, `compare_peak_memory` after all timing,
and hands the records to `make_result` and `save_result`. Run one with::

    python -m benchmarks.NAME [--quick] [--set key=value ...]

`compare` times both sides in the same process, interleaved (A B, B A, …), so that drift hits both alike. Every
ratio is oriented so that **> 1 means the candidate is better**: ``speed_ratio`` is the median over rounds of
peer seconds / candidate seconds (the two calls of one round see the same machine state), ``memory_ratio`` is peer
peak bytes / candidate peak bytes.

Peak memory is the growth of the process's resident set size during a call: on Linux the kernel's high-water mark
(reset through ``/proc/self/clear_refs``), elsewhere RSS sampled every millisecond. torch's CPU tensors are not
visible to tracemalloc. With glibc's self-adjusting mmap threshold one and the same forward pass peaked anywhere
between 125 and 190 MB, so `compare_peak_memory` first fixes the threshold at 128 KiB; that slows large allocations
for the rest of the process, hence memory is measured after all timing.

Each benchmark's reasoning (why it is set up so, how to read it, caveats) is prose in ``about/NAME.md``; it goes into
its section of RESULTS.md. Results land in ``benchmarks/results/NAME.json``
(``results/quick/`` for quick runs, which never overwrite the real numbers) and ``benchmarks/RESULTS.md`` is
regenerated from every JSON file there. ``HF_EXT_BENCH_OUTPUT=DIR`` writes
``DIR/results`` and ``DIR/RESULTS.md`` instead (the tests use it); ``HF_EXT_BENCH_THREADS=N`` fixes torch's threads.
"""

import argparse
import copy
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
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


def reset_high_water_mark() -> bool:
    """Set the kernel's high-water mark VmHWM to the current RSS; False where that is not possible (not Linux)."""
    try:
        CLEAR_REFS.write_text("5")
        status_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def peak_memory_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the process's RSS peaked above its level just before ``fn()`` (see the module docstring)."""
    release_free_memory()
    if reset_high_water_mark():
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


def informational_metric(description: str, unit: str, candidate: float, peer: float, ratio: float | None,
                         ratio_definition: str, **extra) -> dict:
    """A RESULTS.md row without a goal comparing candidate and peer on a number that is not a speed (an accuracy,
    a loss, a cache size). `ratio` fills the table's ratio column; `ratio_definition` says how it is oriented."""
    return {"description": description, "unit": unit, "candidate": candidate, "peer": peer, **extra,
            "speed_ratio": ratio, "ratio_definition": ratio_definition,
            "goal": None, "min_speed_ratio": None, "passed": None}


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


BENCHMARKS_DIR = Path(__file__).resolve().parent
OUTPUT_ENVIRONMENT_VARIABLE = "HF_EXT_BENCH_OUTPUT"


def output_dir() -> Path:
    """Where ``results/`` and ``RESULTS.md`` are written: ``$HF_EXT_BENCH_OUTPUT`` or this folder."""
    return Path(os.environ.get(OUTPUT_ENVIRONMENT_VARIABLE) or BENCHMARKS_DIR)


def results_dir(quick: bool) -> Path:
    """``results/`` of the output folder, or ``results/quick/`` for quick runs."""
    return output_dir() / "results" / ("quick" if quick else "")


def save_result(result: dict, figure=None, started: float | None = None) -> Path:
    """Write ``results/NAME.json`` (quick runs: ``results/quick/NAME.json``), with ``figure`` (a matplotlib figure or
    None) saved as ``NAME.png`` beside it, and regenerate ``RESULTS.md`` after a full run. ``started`` (a
    `time.perf_counter()` reading) records and prints the run's ``total_seconds``."""
    if started is not None:
        result["total_seconds"] = time.perf_counter() - started
        log(f"{result['total_seconds']:.0f} s in all")
    directory = results_dir(result.get("quick", False))
    directory.mkdir(parents=True, exist_ok=True)
    result.setdefault("plots", [])
    if figure is not None:
        picture = save_figure(figure, directory / f"{result['benchmark']}.png")
        if not result.get("quick"):
            result["plots"] = [str(picture.relative_to(output_dir()))]
    path = directory / f"{result['benchmark']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not result.get("quick"):
        write_results_table(output_dir())
    log(f"results in {path}")
    return path


def log(message: str) -> None:
    """Progress and summary lines of a benchmark, flushed at once (long runs are followed in a log file)."""
    print(message, flush=True)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (after saying so) when matplotlib is missing:
    plots are optional extras of a benchmark, never a reason for it to fail."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'hf-ext[plot]'): no plot written.")
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
        "Generated by `benchmarks/harness.py` from `benchmarks/results/*.json`; do not edit by hand. "
        "Run one benchmark with `python -m benchmarks.NAME` (`--quick` for a smoke run).",
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
        # Per benchmark: what it means and why it is set up so (about/NAME.md, prose kept out of the code), then
        # its own tables (markdown) and plots (paths relative to benchmarks/).
        about = BENCHMARKS_DIR / "about" / f"{result['benchmark']}.md"
        extra = [*([about.read_text().strip()] if about.is_file() else []), *result.get("markdown_tables", []),
                 *(f"![{result['benchmark']}]({plot})" for plot in result.get("plots", []))]
        if extra:
            details += ["", f"## {result['benchmark']}"]
            for item in extra:
                details += ["", item]
    table = benchmarks_dir / "RESULTS.md"
    table.write_text("\n".join(lines + details) + "\n")
    return table


# ----------------------------------------------------------------------------------------------------------------
# Running a benchmark
# ----------------------------------------------------------------------------------------------------------------


def benchmark_names() -> list[str]:
    """Every benchmark module of this folder (the files that define ``run``; helpers live in ``tasks/``)."""
    skip = {"__init__", "__main__", "harness"}
    return sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if p.stem not in skip and not p.stem.startswith("_"))


def run_benchmark(name_or_module, quick: bool = False, **overrides) -> dict:
    """Run one benchmark (a name from `benchmark_names` or its module) with ``FULL`` or ``QUICK`` settings;
    ``overrides`` replace single settings (unknown keys are an error). Returns the result document."""
    module = name_or_module
    if isinstance(name_or_module, str):
        if name_or_module not in benchmark_names():
            raise ValueError(f"Unknown benchmark {name_or_module!r}; available: {', '.join(benchmark_names())}.")
        module = importlib.import_module(f"benchmarks.{name_or_module}")
    return module.run(benchmark_settings(module.FULL, module.QUICK, quick, overrides), quick=quick)


def _setting(text: str) -> tuple[str, object]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main(argv: list[str] | None = None, module=None) -> dict:
    """The command line of every benchmark: ``python -m benchmarks.NAME [--quick] [--set key=value ...]``.

    ``module`` defaults to the one run as ``__main__``; values of ``--set`` are read as JSON where they parse."""
    module = module or sys.modules["__main__"]
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module.NAME}",
                                     description=(module.__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds into results/quick/")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting (known: {', '.join(sorted(module.FULL))})")
    arguments = parser.parse_args(argv)
    return run_benchmark(module, quick=arguments.quick, **dict(arguments.set))
