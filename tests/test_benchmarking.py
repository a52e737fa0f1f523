"""The benchmark harness: ratio math, interleaving, result files, the RESULTS.md table, finding scripts.

No real benchmark runs here and nothing asserts on wall-clock time: timing goes through a fake clock.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from hf_ext import benchmarking


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
    assert benchmarking.speed_ratio([1.0, 1.0, 1.0], [2.0, 2.0, 2.0]) == 2.0
    # Round 2 ran while the machine was slow for both sides; pairing keeps the ratio at 2.
    assert benchmarking.speed_ratio([1.0, 4.0, 1.0], [2.0, 8.0, 2.0]) == 2.0
    assert benchmarking.speed_ratio([2.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="one candidate and one peer time per round"):
        benchmarking.speed_ratio([1.0, 1.0], [1.0])


def test_memory_ratio_above_one_when_candidate_needs_less():
    assert benchmarking.memory_ratio(100, 200) == 2.0
    assert benchmarking.memory_ratio(0, 200) is None


def test_compare_interleaves_alternating_order_and_reports_throughput(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(benchmarking.time, "perf_counter", clock)
    log = []
    record = benchmarking.compare(
        clock.work(1.0, log, "A"),
        clock.work(2.0, log, "B"),
        work=100,
        unit="tokens/s",
        repeats=4,
        warmup=1,
        min_speed_ratio=0.95,
    )
    assert log == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert record["candidate_seconds"] == [1.0] * 4 and record["peer_seconds"] == [2.0] * 4
    assert record["candidate"] == 100.0 and record["peer"] == 50.0
    assert record["speed_ratio"] == 2.0 and record["ratio_of_medians"] == 2.0
    assert record["passed"] is True and record["goal"] == "speed_ratio >= 0.95"


def test_compare_fails_goal_when_candidate_is_slower(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(benchmarking.time, "perf_counter", clock)
    record = benchmarking.compare(
        clock.work(2.0, [], "A"), clock.work(1.0, [], "B"), work=1, unit="calls/s", repeats=3, warmup=0,
        min_speed_ratio=0.95,
    )
    assert record["speed_ratio"] == 0.5 and record["passed"] is False
    with pytest.raises(ValueError, match="repeats >= 1"):
        benchmarking.compare(lambda: None, lambda: None, work=1, unit="calls/s", repeats=0)


@pytest.mark.skipif(not benchmarking._can_reset_high_water_mark(), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_growth_sees_torch_cpu_tensors():
    def allocate():
        block = torch.ones(16 * 2**20)  # 64 MiB, allocated by torch's C++ allocator (invisible to tracemalloc)
        return block.sum()

    assert benchmarking.peak_memory_growth(allocate) >= 48 * 2**20
    assert benchmarking.peak_memory_growth(lambda: None) < 16 * 2**20


def test_compare_peak_memory_takes_medians_and_orients_the_ratio(monkeypatch):
    # The real call fixes glibc's mmap threshold for the whole process; keep the test process as it is.
    monkeypatch.setattr(benchmarking, "fix_mmap_threshold", lambda: None)
    peaks = iter([100, 300, 90, 310, 500, 290])  # candidate, peer, candidate, peer, ...
    monkeypatch.setattr(benchmarking, "peak_memory_growth", lambda fn: next(peaks))
    record = benchmarking.compare_peak_memory(lambda: None, lambda: None, repeats=3)
    assert record["candidate_peak_bytes"] == 100 and record["peer_peak_bytes"] == 300
    assert record["candidate_peak_bytes_samples"] == [100, 90, 500]
    assert record["memory_ratio"] == 3.0


def _result(name: str, ratio: float, quick: bool = False) -> dict:
    metric = {
        "unit": "tokens/s", "candidate": 1000.0 * ratio, "peer": 1000.0, "speed_ratio": ratio,
        "goal": "speed_ratio >= 0.95", "min_speed_ratio": 0.95, "passed": ratio >= 0.95,
    }
    return benchmarking.make_result(
        name, candidate="Ours", peer="Theirs", settings={"batch": 1}, metrics={"prefill": metric},
        checks={"max_abs_logit_diff": 0.0}, quick=quick,
    )


def test_save_result_writes_json_and_regenerates_table(tmp_path):
    path = benchmarking.save_result(_result("alpha", 1.2), tmp_path)
    assert path == tmp_path / "results" / "alpha.json"
    saved = json.loads(path.read_text())
    assert saved["peer"] == "Theirs" and saved["passed"] is True
    assert "> 1 means the candidate is faster" in saved["ratio_definitions"]["speed_ratio"]
    machine_keys = ("platform", "cpu_count", "torch_threads", "python", "torch", "transformers", "peft", "diffusers")
    assert set(machine_keys) | {"date"} <= set(saved["machine"])

    benchmarking.save_result(_result("beta", 0.5), tmp_path)
    table = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| alpha") or line.startswith("| beta")]
    assert len(rows) == 2
    assert "Ours: 1,200 tokens/s" in rows[0] and "Theirs: 1,000 tokens/s" in rows[0]
    assert "1.200" in rows[0] and "| pass |" in rows[0]
    assert "0.500" in rows[1] and "FAIL" in rows[1]


def test_quick_results_do_not_touch_the_table(tmp_path):
    benchmarking.save_result(_result("alpha", 1.0), tmp_path)
    before = (tmp_path / "RESULTS.md").read_text()
    path = benchmarking.save_result(_result("alpha", 0.1, quick=True), tmp_path)
    assert path == tmp_path / "results" / "quick" / "alpha.json"
    assert json.loads((tmp_path / "results" / "alpha.json").read_text())["metrics"]["prefill"]["speed_ratio"] == 1.0
    assert (tmp_path / "RESULTS.md").read_text() == before


def test_run_benchmark_finds_scripts_in_working_directory(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "fake_bench.py").write_text("def main(quick=False):\n    return {'quick': quick}\n")
    monkeypatch.chdir(tmp_path)
    try:
        assert "fake_bench" in benchmarking.list_benchmarks()
        assert benchmarking.run_benchmark("fake_bench", quick=True) == {"quick": True}
        with pytest.raises(ValueError, match=r"Unknown benchmark 'no_such_bench'; available: .*fake_bench"):
            benchmarking.run_benchmark("no_such_bench")
    finally:
        sys.modules.pop("hf_ext_benchmark_fake_bench", None)


def test_repository_benchmarks_are_listed():
    assert "decoder_vs_llama" in benchmarking.list_benchmarks()


def test_configure_threads_rejects_bad_values(monkeypatch):
    monkeypatch.setenv(benchmarking.THREADS_ENVIRONMENT_VARIABLE, "zero")
    with pytest.raises(ValueError, match="HF_EXT_BENCH_THREADS must be a positive integer"):
        benchmarking.configure_threads()
    monkeypatch.setenv(benchmarking.THREADS_ENVIRONMENT_VARIABLE, str(torch.get_num_threads()))
    assert benchmarking.configure_threads() == torch.get_num_threads()


def test_results_table_without_results_is_just_the_header(tmp_path):
    (tmp_path / "results").mkdir()
    table = Path(benchmarking.write_results_table(tmp_path)).read_text()
    assert "| benchmark | metric |" in table


def test_table_shows_what_a_non_speed_ratio_means_and_the_extra_tables(tmp_path):
    result = _result("loss_bench", 1.5)
    result["metrics"]["prefill"]["ratio_definition"] = "peer loss / candidate loss"
    result["markdown_tables"] = ["| length | loss |\n|---|---|\n| 2048 | 1.23 |"]
    result["plots"] = ["results/loss_bench.png"]
    benchmarking.save_result(result, tmp_path)
    table = (tmp_path / "RESULTS.md").read_text()
    assert "1.500 (peer loss / candidate loss)" in table
    assert "## loss_bench" in table and "| 2048 | 1.23 |" in table
    assert "![loss_bench](results/loss_bench.png)" in table


def test_pyplot_is_none_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert benchmarking.pyplot() is None
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_save_figure_creates_folders_and_closes_the_figure(tmp_path):
    plt = benchmarking.pyplot()
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    path = benchmarking.save_figure(figure, tmp_path / "new" / "plot.png")
    assert path == tmp_path / "new" / "plot.png" and path.stat().st_size > 0
    assert not plt.fignum_exists(figure.number)
