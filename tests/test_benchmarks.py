"""The benchmarks: the shared harness (ratio math, interleaving, result files, the RESULTS.md table) and a quick run
of every benchmark in `benchmarks/` that checks the result it writes.

Nothing here asserts on wall-clock time: the harness tests time through a fake clock, and the quick runs only check
that each benchmark runs end to end and writes a well-formed result.
"""

import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from benchmarks import harness

REPOSITORY = Path(__file__).resolve().parents[1]


class FakeClock:
    """Stands in for time.perf_counter; each benchmarked callable advances it by its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float, log: list, label: str):
        def run():
            log.append(label)
            self.now += seconds

        return run


def test_speed_ratio_is_the_median_of_paired_ratios_above_one_when_candidate_is_faster():
    assert harness.speed_ratio([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == 2.0
    # Round 2 ran while the machine was slow for both sides; pairing keeps the ratio at 2.
    assert harness.speed_ratio([1.0, 4.0, 1.0], [2.0, 8.0, 2.0]) == 2.0
    assert harness.speed_ratio([2.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="one candidate and one peer time per round"):
        harness.speed_ratio([1.0, 1.0], [1.0])
    assert harness.memory_ratio(100, 200) == 2.0
    assert harness.memory_ratio(0, 200) is None


def test_compare_interleaves_alternating_order_and_reports_throughput(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    log = []
    record = harness.compare(clock.work(1.0, log, "A"), clock.work(2.0, log, "B"), work=100, unit="tokens/s",
                             repeats=4, warmup=1, min_speed_ratio=0.95)
    assert log == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert record["candidate_seconds"] == [1.0] * 4 and record["peer_seconds"] == [2.0] * 4
    assert record["candidate"] == 100.0 and record["peer"] == 50.0
    assert record["speed_ratio"] == 2.0 and record["ratio_of_medians"] == 2.0
    assert record["passed"] is True and record["goal"] == "speed_ratio >= 0.95"

    slower = harness.compare(clock.work(2.0, [], "A"), clock.work(1.0, [], "B"), work=1, unit="calls/s", repeats=3,
                             warmup=0, min_speed_ratio=0.95)
    assert slower["speed_ratio"] == 0.5 and slower["passed"] is False
    with pytest.raises(ValueError, match="repeats >= 1"):
        harness.compare(lambda: None, lambda: None, work=1, unit="calls/s", repeats=0)


@pytest.mark.skipif(not harness.reset_high_water_mark(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_growth_sees_torch_cpu_tensors():
    def allocate():
        block = torch.ones(16 * 2**20)  # 64 MiB, allocated by torch's C++ allocator (invisible to tracemalloc)
        return block.sum()

    assert harness.peak_memory_growth(allocate) >= 48 * 2**20
    assert harness.peak_memory_growth(lambda: None) < 16 * 2**20


def test_compare_peak_memory_takes_medians_and_orients_the_ratio(monkeypatch):
    # The real call fixes glibc's mmap threshold for the whole process; keep the test process as it is.
    monkeypatch.setattr(harness, "fix_mmap_threshold", lambda: None)
    peaks = iter([100, 300, 90, 310, 500, 290])  # candidate, peer, candidate, peer, ...
    monkeypatch.setattr(harness, "peak_memory_growth", lambda fn: next(peaks))
    record = harness.compare_peak_memory(lambda: None, lambda: None, repeats=3)
    assert record["candidate_peak_bytes"] == 100 and record["peer_peak_bytes"] == 300
    assert record["candidate_peak_bytes_samples"] == [100, 90, 500]
    assert record["memory_ratio"] == 3.0


def _result(name: str, ratio: float, quick: bool = False) -> dict:
    metric = {"unit": "tokens/s", "candidate": 1000.0 * ratio, "peer": 1000.0, "speed_ratio": ratio,
              "goal": "speed_ratio >= 0.95", "min_speed_ratio": 0.95, "passed": ratio >= 0.95}
    return harness.make_result(name, candidate="Ours", peer="Theirs", settings={"batch": 1},
                               metrics={"prefill": metric}, checks={"max_abs_logit_diff": 0.0}, quick=quick)


@pytest.fixture
def output(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(harness.OUTPUT_ENVIRONMENT_VARIABLE, str(tmp_path))
    return tmp_path


def test_save_result_writes_json_and_regenerates_the_table(output):
    path = harness.save_result(_result("alpha", 1.2))
    assert path == output / "results" / "alpha.json"
    saved = json.loads(path.read_text())
    assert saved["peer"] == "Theirs" and saved["passed"] is True and saved["plots"] == []
    assert "> 1 means the candidate is faster" in saved["ratio_definitions"]["speed_ratio"]
    machine_keys = ("platform", "cpu_count", "torch_threads", "python", "torch", "transformers", "peft", "diffusers")
    assert set(machine_keys) | {"date"} <= set(saved["machine"])

    started = time.perf_counter() - 2.0  # a run that began two seconds ago
    assert json.loads(harness.save_result(_result("beta", 0.5), started=started).read_text())["total_seconds"] >= 2.0
    table = (output / "RESULTS.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| alpha") or line.startswith("| beta")]
    assert len(rows) == 2
    assert "Ours: 1,200 tokens/s" in rows[0] and "Theirs: 1,000 tokens/s" in rows[0]
    assert "1.200" in rows[0] and "| pass |" in rows[0]
    assert "0.500" in rows[1] and "FAIL" in rows[1]


def test_quick_results_do_not_touch_the_table(output):
    harness.save_result(_result("alpha", 1.0))
    before = (output / "RESULTS.md").read_text()
    path = harness.save_result(_result("alpha", 0.1, quick=True))
    assert path == output / "results" / "quick" / "alpha.json"
    assert json.loads((output / "results" / "alpha.json").read_text())["metrics"]["prefill"]["speed_ratio"] == 1.0
    assert (output / "RESULTS.md").read_text() == before


def test_table_shows_what_a_ratio_means_the_extra_tables_the_about_text_and_the_figure(output):
    plt = harness.pyplot()
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    result = _result("decoder_vs_llama", 1.5)  # a real name: its about/ text goes into the table
    result["metrics"]["prefill"]["ratio_definition"] = "peer loss / candidate loss"
    result["markdown_tables"] = ["| length | loss |\n|---|---|\n| 2048 | 1.23 |"]
    harness.save_result(result, figure)
    assert not plt.fignum_exists(figure.number)
    assert (output / "results" / "decoder_vs_llama.png").stat().st_size > 0
    table = (output / "RESULTS.md").read_text()
    assert "1.500 (peer loss / candidate loss)" in table
    assert "## decoder_vs_llama" in table and "| 2048 | 1.23 |" in table
    assert "![decoder_vs_llama](results/decoder_vs_llama.png)" in table
    about = harness.BENCHMARKS_DIR / "about" / "decoder_vs_llama.md"
    assert about.read_text().strip().splitlines()[0] in table


def test_configure_threads_and_the_command_line_reject_bad_values(monkeypatch):
    monkeypatch.setenv(harness.THREADS_ENVIRONMENT_VARIABLE, "zero")
    with pytest.raises(ValueError, match="HF_EXT_BENCH_THREADS must be a positive integer"):
        harness.configure_threads()
    monkeypatch.setenv(harness.THREADS_ENVIRONMENT_VARIABLE, str(torch.get_num_threads()))
    assert harness.configure_threads() == torch.get_num_threads()
    with pytest.raises(ValueError, match=r"Unknown benchmark 'no_such_bench'; available: .*decoder_vs_llama"):
        harness.run_benchmark("no_such_bench")
    with pytest.raises(ValueError, match=r"Unknown settings \['no_such_setting'\]"):
        harness.run_benchmark("decoder_vs_llama", quick=True, no_such_setting=1)


def test_pyplot_is_none_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert harness.pyplot() is None
    assert "matplotlib is not installed" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Every benchmark, quick, through its command line


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Checks a benchmark records that must hold for its numbers to mean anything (equal data, equal starting weights,
# finite losses, exact equivalences); other booleans in `checks` are observations and may be false.
MUST_HOLD = re.compile(r"passed|all_finite|generate_matches_argmax_all|greedy_tokens_identical|same_data_order|"
                       r"same_initial_weights|digit_split_disjoint|logits_passed|same_targets|same_kv_bytes|"
                       r"kv_bytes_formula|.*_bitwise_equal|bit_identical.*")


def _failed_checks(checks, path="checks") -> list[str]:
    items = checks.items() if isinstance(checks, dict) else enumerate(checks) if isinstance(checks, list) else []
    failed = []
    for key, value in items:
        if value is False and isinstance(key, str) and MUST_HOLD.fullmatch(key):
            failed.append(f"{path}.{key}")
        failed += _failed_checks(value, f"{path}.{key}")
    return failed


QUICK_TEST = "test_benchmark_runs_quick_and_writes_a_well_formed_result"


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory) -> dict:
    """Starts the quick run of every selected benchmark, two processes at a time with one thread each (CI machines
    have two cores; importing the stack is single-threaded, so pairs finish in about half the time of a row).
    Returns {name: (future of the finished process, its output folder)}."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == QUICK_TEST]
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for name in selected:
        output = tmp_path_factory.mktemp(name)
        environment = dict(os.environ, **{harness.OUTPUT_ENVIRONMENT_VARIABLE: str(output),
                                          harness.THREADS_ENVIRONMENT_VARIABLE: "1"})
        command = [sys.executable, "-m", f"benchmarks.{name}", "--quick"]
        runs[name] = (pool.submit(subprocess.run, command, cwd=REPOSITORY, env=environment, capture_output=True,
                                  text=True, timeout=1200), output)
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", harness.benchmark_names())
def test_benchmark_runs_quick_and_writes_a_well_formed_result(name, quick_runs):
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.NAME == name and isinstance(module.FULL, dict) and isinstance(module.QUICK, dict)
    assert set(module.QUICK) == set(module.FULL), "QUICK and FULL must name the same settings"
    lines = len((harness.BENCHMARKS_DIR / f"{name}.py").read_text().splitlines())
    assert lines <= 400, f"benchmarks/{name}.py has {lines} lines; the ceiling is 400 (goal 300)"

    future, tmp_path = quick_runs[name]
    completed = future.result()
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    assert not (tmp_path / "results" / f"{name}.json").exists() and not (tmp_path / "RESULTS.md").exists()
    result = json.loads((tmp_path / "results" / "quick" / f"{name}.json").read_text())
    assert result["benchmark"] == name and result["quick"] is True
    assert result["candidate"] and result["peer"] and isinstance(result["checks"], dict)
    assert _failed_checks(result["checks"]) == []
    assert set(module.QUICK) <= set(result["settings"])
    assert {"cpu", "torch", "transformers", "date"} <= set(result["machine"])
    assert result["metrics"], "a benchmark must report at least one metric"
    for metric_name, metric in result["metrics"].items():
        assert isinstance(metric["unit"], str), metric_name
        assert _finite_number(metric["candidate"]) and _finite_number(metric["peer"]), metric_name
        assert metric.get("speed_ratio") is None or _finite_number(metric["speed_ratio"]), metric_name
        assert metric.get("passed") in (None, True, False), metric_name
        assert (metric.get("passed") is None) == (metric.get("goal") is None), metric_name
    goals = [m["passed"] for m in result["metrics"].values() if m.get("passed") is not None]
    assert result["passed"] == (all(goals) if goals else None)
    for table in result.get("markdown_tables", []):
        assert isinstance(table, str) and table.strip()
