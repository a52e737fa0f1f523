"""The device check (benchmarks/device_check.py) in its quick CPU mode, end to end in a subprocess: every section
runs, every parity check is within its tolerance, the ratio rows and both report files are well formed. Plus the
budget machinery in-process: a section out of time keeps its rows, a failing row or section does not stop the rest,
and an exhausted global budget still writes a report."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import device_check
from benchmarks.tasks.device_common import Section

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return json.loads((out / "device_check.json").read_text()), (out / "device_check.md").read_text(), completed.stdout


def test_every_section_ran_to_the_end(quick_report):
    result, _, output = quick_report
    assert result["finished"] is True and result["quick"] is True
    assert list(result["sections"]) == device_check.SECTION_NAMES
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section.get("error") or section.get("reason"), output[-3000:])
        assert section["seconds"] >= 0 and section["rows"], name
        assert all(row["status"] in ("ok", "skipped") for row in section["rows"]), name
    assert result["environment"]["hf_ext_import"] == "ok"
    assert {"torch", "transformers", "peft", "device"} <= set(result["environment"])


def test_parity_errors_are_within_tolerance(quick_report):
    result, _, _ = quick_report
    checked = []
    for name, section in result["sections"].items():
        if section["part"] != "A":
            continue
        for row in section["rows"]:
            if row.get("passed") is None:
                continue  # informational rows (Lion against float64)
            assert row["passed"] is True, (name, row)
            assert row["error_value"] <= row["tolerance"], (name, row)
            checked.append(row["name"])
    for dtype in ("float32", "bfloat16"):
        for implementation in ("hfx_rerope", "hfx_leaky_rerope"):
            assert {f"{implementation} prefill {dtype}", f"{implementation} decode {dtype}"} <= set(checked)
        assert {f"hfx_rerope backward {dtype}", f"mla absorbed vs expanded {dtype}",
                f"tailr fused {dtype}"} <= set(checked)
    assert any(row.startswith("lion fused vs") for row in checked)
    assert {"udm_vs_ddpm", "udm_vs_ddim_eta0", "reflow_euler_vs_flow_match_euler"} <= set(checked)
    # the ReRoPE rows compared something that differs from plain RoPE
    notes = result["sections"]["parity_rerope"]["notes"]
    assert notes["hfx_rerope_vs_sdpa_float64"] > 1e-3 and notes["hfx_leaky_rerope_vs_sdpa_float64"] > 1e-3


def test_ratio_rows_state_times_and_goals(quick_report):
    result, _, _ = quick_report
    rows = {row["name"]: row for name, section in result["sections"].items() if section["part"] == "B"
            for row in section["rows"]}
    for name in ("rerope_prefill_256", "rerope_prefill_512", "lion_step", "tailr_vs_transformers_256",
                 "mla_decode_128", "lora_ga_memory"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0
        assert row["candidate_peak_bytes"] is None and row["memory_ratio"] is None  # no memory figure on the CPU
        assert row["goal"]
    assert rows["mla_decode_128"]["greedy_tokens_equal"] is True
    assert rows["tailr_vs_liger_256"]["status"] in ("ok", "skipped")  # Liger needs a GPU
    assert rows["rerope_prefill_memory_growth"]["status"] == "skipped"
    assert result["metrics"] and all(math.isfinite(m["candidate"]) for m in result["metrics"].values())


def test_markdown_has_the_three_tables(quick_report):
    result, text, _ = quick_report
    assert "| section | status | seconds | note |" in text
    assert "A. Parity against float64" in text and "B. hf_ext beside its peers" in text
    assert "**FAIL**" not in text
    assert len(result["markdown_tables"]) == 3 and all(table in text for table in result["markdown_tables"])


# ----------------------------------------------------------------------------------------------------------------
# Budget and failure handling, in-process (no model is built)


def _section(seconds: float) -> Section:
    return Section("probe", torch.device("cpu"), True, {}, deadline=time.monotonic() + seconds)


def test_a_section_out_of_time_keeps_its_rows():
    def slow(section):
        section.add({"name": "first", "passed": True})
        time.sleep(5)
        section.add({"name": "never"})

    started = time.monotonic()
    record = device_check.run_section("probe", slow, _section(0.3))
    assert time.monotonic() - started < 3
    assert record["status"] == "timeout" and "budget" in record["reason"]
    assert [row["name"] for row in record["rows"]] == ["first"] and record["passed"] is True


def test_failing_rows_and_sections_are_recorded_not_raised():
    def failing(section):
        section.guarded("row that fails", lambda: 1 / 0)
        section.guarded("row that works", lambda: {"passed": True})
        raise RuntimeError("section broke")

    record = device_check.run_section("probe", failing, _section(10))
    assert record["status"] == "error" and "RuntimeError: section broke" in record["error"]
    assert [row["status"] for row in record["rows"]] == ["error", "ok"]
    assert "ZeroDivisionError" in record["rows"][0]["error"]

    def missing_diffusers(section):
        raise ModuleNotFoundError("diffusers not installed", name="diffusers")

    record = device_check.run_section("probe", missing_diffusers, _section(10))
    assert record["status"] == "skipped" and record["reason"] == "diffusers not installed"


def test_an_exhausted_global_budget_skips_sections_and_still_writes_the_report(tmp_path):
    settings = json.loads(json.dumps(device_check.QUICK))
    settings["budget_seconds"] = 0
    result = device_check.run(settings, quick=True, device="cpu", out=str(tmp_path))
    assert {s["status"] for s in result["sections"].values()} == {"skipped"}
    assert all("global time budget" in s["reason"] for s in result["sections"].values())
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["finished"] is True and saved["checks"]["passed"] is False
    assert (tmp_path / "device_check.md").read_text().count("| skipped |") == len(device_check.SECTION_NAMES)


def test_cuda_shaped_rows_become_memory_metrics_and_table_cells():
    """What only a GPU run produces (peak memory, the memory-growth fit), on synthetic rows."""
    ratio = {"name": "tailr_vs_liger_4096", "status": "ok", "tokens": 4096, "candidate": "fused", "peer": "liger",
             "what": "4096 tokens", "candidate_seconds": 0.012, "peer_seconds": 0.010, "time_ratio": 1.2,
             "candidate_peak_bytes": 3 * 2**20, "peer_peak_bytes": 2 * 2**20, "memory_ratio": 1.5,
             "max_time_ratio": 1.2, "time_goal_met": True, "max_memory_ratio": 1.05, "memory_goal_met": False,
             "goal": "memory within 5%", "met": False}
    growth = {"name": "rerope_prefill_memory_growth", "status": "ok", "kind": "growth", "lengths": [4096, 16384],
              "loglog_exponent": 1.01, "peer_loglog_exponent": 1.0, "max_exponent": 1.2, "goal": "linear",
              "met": True, "candidate": "hfx_rerope", "peer": "sdpa"}
    sections = {"ratio_tailr_loss": {"part": "B", "status": "ok", "rows": [ratio, growth], "seconds": 1.0}}
    metrics = device_check._harness_metrics(sections)
    assert metrics["tailr_vs_liger_4096_memory"]["passed"] is False
    assert metrics["tailr_vs_liger_4096_memory"]["candidate"] == 3.0
    assert metrics["tailr_vs_liger_4096_time"]["passed"] is True
    assert metrics["rerope_prefill_memory_growth"]["passed"] is True
    report = {"environment": {"device": "cuda", "device_name": "GPU", "torch": "t", "transformers": "x",
                              "peft": "p", "date": "2026-01-01"}, "quick": False, "sections": sections}
    status, _, ratios = device_check.markdown(report)
    assert "Device check on GPU" in status and "1.5 (3 MiB / 2 MiB)" in ratios and "exponent 1.01" in ratios
