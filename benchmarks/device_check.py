"""Device check: hf_ext's device paths against float64 references (A) and beside their peers (B), in one process.

    python -m benchmarks.device_check --device cuda|cpu [--quick] [--out DIR] [--budget-seconds S] [--only NAME ...]

A. Parity against float64 on the CPU, with a tolerance per dtype: ReRoPE / Leaky ReRoPE prefill and decode and a
   ReRoPE training backward (a small Llama with ``attn_implementation="hfx_rerope"``), MLA absorbed vs expanded
   decoding (bf16, fp32), the fused TaiLr loss and its gradients, fused Lion bit for bit against lion_pytorch, UDM
   and ReFlow against diffusers' DDPM/DDIM/FlowMatchEuler.
B. Ratios hf_ext / peer, interleaved in this process (CUDA events, ``max_memory_allocated``; on the CPU perf_counter
   and no memory figure): hfx_rerope vs sdpa prefill, Lion vs AdamW(fused), fused TaiLr vs Liger and transformers'
   loss, MLA absorbed decode vs DeepseekV3, LoRA-GA init memory vs PEFT. Goals: `tasks.device_ratios.GOALS`.

Every section has a time budget (``budgets``) inside a global one (``budget_seconds``); a section that runs out stops
where it is (status "timeout"), and sections that no longer fit are skipped with the reason. Rows catch their own
errors and out-of-memory; `device_check.json` and `device_check.md` are rewritten after every section, so a killed
run still leaves a partial report. The JSON is a harness result (``metrics``, ``checks``, ``markdown_tables``) plus
``sections`` (status, seconds, rows, notes per section) and ``environment``. ``--quick``: tiny sizes, seconds.
On a lent GPU machine run it through ``scripts/device_check.sh`` (it installs the wheels carried in ``.whl/``).
"""

import argparse
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from .harness import log, machine_info, make_result, output_dir, results_dir, write_results_table
from .lion_step_speed import QUICK_MODEL as LION_QUICK_MODEL
from .tasks import device_parity, device_ratios
from .tasks.device_common import BudgetExhausted, Section, free_memory
from .tasks.parameter_sets import SMOLLM2_135M

NAME = "device_check"

# (name, part, function); run in this order: the parity checks first, they are short.
SECTIONS = [
    ("parity_rerope", "A", device_parity.rerope),
    ("parity_mla", "A", device_parity.mla),
    ("parity_tailr", "A", device_parity.tailr),
    ("parity_lion", "A", device_parity.lion),
    ("parity_schedulers", "A", device_parity.schedulers),
    ("ratio_rerope_prefill", "B", device_ratios.rerope_prefill),
    ("ratio_lion_step", "B", device_ratios.lion_step),
    ("ratio_tailr_loss", "B", device_ratios.tailr_loss),
    ("ratio_mla_decode", "B", device_ratios.mla_decode),
    ("ratio_lora_ga_memory", "B", device_ratios.lora_ga_memory),
]
SECTION_NAMES = [name for name, _, _ in SECTIONS]
SKIP_REASONS = {"diffusers": "diffusers not installed"}  # a missing optional package skips its section
DTYPES = ["float32", "bfloat16"]

FULL = {
    "budget_seconds": 400,  # the device run must end well inside 8 minutes, start-up and installs included
    # Seconds per section (a section stops where it is when its budget runs out). ReRoPE's include compiling
    # flex attention on CUDA (forward and backward, per variant and length), Lion's the fused Triton kernel.
    "budgets": {"parity_rerope": 120, "parity_mla": 15, "parity_tailr": 15, "parity_lion": 40,
                "parity_schedulers": 10, "ratio_rerope_prefill": 90, "ratio_lion_step": 25,
                "ratio_tailr_loss": 30, "ratio_mla_decode": 30, "ratio_lora_ga_memory": 40},
    "parity_rerope": {"length": 144, "prompt": 128, "window": 32, "logn_training_length": 64, "dtypes": DTYPES},
    "parity_mla": {"length": 24, "prompt": 16, "dtypes": DTYPES},
    "parity_tailr": {"tokens": 512, "vocab_size": 4096, "hidden_size": 256, "chunk_size": 128, "dtypes": DTYPES},
    "parity_lion": {"model": dict(SMOLLM2_135M, num_hidden_layers=2), "steps": 3},
    "parity_schedulers": {"shape": [2, 4, 16, 16], "steps": 50},
    "ratio_rerope_prefill": {"layers": 8, "vocab_size": 49152, "lengths": [4096, 16384, 32768],
                             "dtype": "bfloat16", "repeats": 3, "warmup": 1},
    "ratio_lion_step": {"model": SMOLLM2_135M, "repeats": 10, "warmup": 3},
    "ratio_tailr_loss": {"tokens": [4096, 16384], "vocab_size": 49152, "dtype": "bfloat16", "repeats": 5,
                         "warmup": 1},
    "ratio_mla_decode": {"contexts": [4096, 16384], "batch": 1, "decode_steps": 8, "dtype": "bfloat16",
                         "repeats": 5},
    "ratio_lora_ga_memory": {"model": "smollm2-135m-shaped", "batches": 4, "batch_size": 2, "sequence_length": 256,
                             "repeats": 2},
}
# Quick: tiny sizes for CI and a smoke run; its ratio rows run in fp32 (bf16 matrix products are slow on CPUs without
# bf16 units; part A covers bf16).
QUICK = {
    **FULL,
    "budget_seconds": 300,
    "budgets": {name: 60 for name in SECTION_NAMES},
    "parity_lion": {"model": LION_QUICK_MODEL, "steps": 3},
    "parity_schedulers": {"shape": [2, 4, 8, 8], "steps": 20},
    "ratio_rerope_prefill": {"layers": 2, "vocab_size": 4096, "lengths": [256, 512], "dtype": "float32",
                             "repeats": 2, "warmup": 1},
    "ratio_lion_step": {"model": LION_QUICK_MODEL, "repeats": 3, "warmup": 1},
    "ratio_tailr_loss": {"tokens": [256], "vocab_size": 4096, "dtype": "float32", "repeats": 2, "warmup": 1},
    "ratio_mla_decode": {"contexts": [128], "batch": 1, "decode_steps": 2, "dtype": "float32", "repeats": 2},
    "ratio_lora_ga_memory": {"model": "tiny", "batches": 2, "batch_size": 2, "sequence_length": 32, "repeats": 1},
}


# ----------------------------------------------------------------------------------------------------------------
# Running the sections


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Versions, the device and the settings that change numbers (TF32), and whether hf_ext imports."""
    info = {**machine_info(), "device": str(device), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            **{name: _package_version(name) for name in ("triton", "lion-pytorch", "liger-kernel", "accelerate")}}
    if device.type == "cuda":
        try:
            properties = torch.cuda.get_device_properties(device)
            info.update(device_name=properties.name, capability=f"{properties.major}.{properties.minor}",
                        device_memory_bytes=properties.total_memory, cuda_runtime=torch.version.cuda)
        except Exception as error:  # noqa: BLE001
            info["device_error"] = f"{type(error).__name__}: {error}"
    try:
        import hf_ext  # noqa: F401

        info["hf_ext_import"] = "ok"
    except Exception as error:  # noqa: BLE001 - every section will fail the same way; say it once, up front
        info["hf_ext_import"] = f"{type(error).__name__}: {error}"
    return info


def _alarm_available() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


# Whether a section's own code is running: only then do the alarm and SIGTERM handlers raise (elsewhere, in the
# bookkeeping between sections, they only leave a flag).
_INSIDE_SECTION = {"now": False}


def _interrupt(message: str) -> None:
    if _INSIDE_SECTION["now"]:
        _INSIDE_SECTION["now"] = False
        raise BudgetExhausted(message)


def run_section(name: str, function, section: Section) -> dict:
    """Run one section under its deadline (SIGALRM where available) and return its record."""
    started = time.monotonic()
    record = {"status": "ok", "budget_seconds": round(section.time_left(), 1)}

    def on_alarm(signum, frame):
        _interrupt(f"time budget of {record['budget_seconds']:.0f} s exhausted")

    if _alarm_available():
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(section.time_left(), 0.01))
    try:
        _INSIDE_SECTION["now"] = True
        function(section)
        _INSIDE_SECTION["now"] = False
    except BudgetExhausted as error:
        record.update(status="timeout", reason=f"{error}; the rest of the section was skipped")
    except ModuleNotFoundError as error:
        reason = SKIP_REASONS.get(error.name or str(error).split()[0])
        if reason is None:
            record.update(status="error", error=f"ModuleNotFoundError: {error}", traceback=traceback.format_exc())
        else:
            record.update(status="skipped", reason=reason)
    except Exception as error:  # noqa: BLE001 - a failed section is a result; the next one still runs
        record.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    finally:
        _INSIDE_SECTION["now"] = False
        if _alarm_available():
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        free_memory()
    failed_rows = [row["name"] for row in section.rows if row["status"] == "error"]
    if failed_rows and record["status"] == "ok":
        record.update(status="error", error=f"rows failed: {', '.join(failed_rows)}")
    verdicts = [row["passed"] for row in section.rows if row.get("passed") is not None]
    record.update(seconds=round(time.monotonic() - started, 2), passed=all(verdicts) if verdicts else None,
                  settings=section.settings, notes=section.notes, rows=section.rows)
    why = record.get("reason") or record.get("error")
    log(f"[{name}] {record['status']} in {record['seconds']:.1f} s" + (f": {why}" if why else ""))
    return record


def _stop_on_sigterm(report: dict):
    """A wall-clock limit (``timeout``) sends SIGTERM: end the running section as out of time, skip the rest, and
    still write the report. Returns the function that restores the previous handler."""
    def on_term(signum, frame):
        report["terminated"] = True  # the loop skips the sections still to come
        _interrupt("terminated by SIGTERM (the wrapper's wall-clock limit)")

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run(settings: dict, quick: bool = False, device: str | None = None, out: str | None = None,
        only: list[str] | None = None) -> dict:
    started = time.monotonic()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 arithmetic
    except RuntimeError as error:  # torch refuses mixing its legacy and new TF32 settings
        log(f"could not turn TF32 off: {error}")
    deadline = started + settings["budget_seconds"]
    report = {"device": device, "quick": quick, "settings": settings, "sections": {}, "started": started,
              "environment": environment(device), "out": out}
    log(f"device check on {report['environment'].get('device_name', device)} ({'quick' if quick else 'full'}), "
        f"budget {settings['budget_seconds']} s; hf_ext import: {report['environment']['hf_ext_import']}")
    restore_sigterm = _stop_on_sigterm(report)
    try:
        for name, part, function in SECTIONS:
            if only and name not in only:
                continue
            left = deadline - time.monotonic()
            if left < 5 or report.get("terminated"):
                reason = ("terminated by SIGTERM" if report.get("terminated") else
                          f"global time budget of {settings['budget_seconds']} s exhausted")
                report["sections"][name] = {"status": "skipped", "part": part, "rows": [], "reason": reason}
                log(f"[{name}] skipped: {reason}")
                continue
            log(f"[{name}] start ({min(left, settings['budgets'][name]):.0f} s budget)")
            section = Section(name, device, quick, settings[name],
                              deadline=time.monotonic() + min(left, settings["budgets"][name]))
            report["sections"][name] = {"part": part, **run_section(name, function, section)}
            write_report(report)
    finally:
        restore_sigterm()
    result = write_report(report, final=True)
    log(f"device check done in {time.monotonic() - started:.0f} s: " + ", ".join(
        f"{name} {record['status']}" for name, record in report["sections"].items()))
    return result


# ----------------------------------------------------------------------------------------------------------------
# The report: harness result document, markdown


def _harness_metrics(sections: dict) -> dict:
    """RESULTS.md rows from the ratio rows: a time metric each, a memory metric where memory was measured."""
    metrics = {}
    for record in sections.values():
        for row in record.get("rows", []):
            if row["status"] != "ok" or record.get("part") != "B":
                continue
            if row.get("kind") == "growth":
                metrics[row["name"]] = {"description": row["goal"], "unit": "log-log exponent of peak vs L",
                                        "candidate": row["loglog_exponent"], "peer": row["peer_loglog_exponent"],
                                        "speed_ratio": None, "goal": f"exponent <= {row['max_exponent']}",
                                        "passed": row["met"]}
                continue
            what = f"{row['what']}: {row['candidate']} vs {row['peer']}"
            limit = row.get("max_time_ratio")
            metrics[f"{row['name']}_time"] = {
                "description": what, "unit": "s", "candidate": row["candidate_seconds"], "peer": row["peer_seconds"],
                "speed_ratio": 1 / row["time_ratio"], "time_ratio": row["time_ratio"],
                "goal": None if limit is None else f"time <= {limit:.3g}x peer (speed_ratio >= {1 / limit:.3f})",
                "passed": None if limit is None else row["time_goal_met"]}
            if row.get("candidate_peak_bytes") is not None and row.get("peer_peak_bytes"):
                limit = row.get("max_memory_ratio")
                metrics[f"{row['name']}_memory"] = {
                    "description": f"peak allocated memory, {what}", "unit": "MiB",
                    "candidate": row["candidate_peak_bytes"] / 2**20, "peer": row["peer_peak_bytes"] / 2**20,
                    "speed_ratio": 1 / row["memory_ratio"], "memory_ratio": row["memory_ratio"],
                    "ratio_definition": "peer peak / hf_ext peak; > 1: hf_ext needs less",
                    "goal": None if limit is None else f"peak <= {limit:.3g}x peer",
                    "passed": None if limit is None else row["memory_goal_met"]}
    return metrics


def _harness_checks(sections: dict) -> dict:
    """Every parity verdict and every section's completion, under keys the benchmark tests read (``passed``)."""
    checks = {"parity": {}, "sections": {}}
    for name, record in sections.items():
        skipped_for_dependency = record["status"] == "skipped" and record.get("reason") in SKIP_REASONS.values()
        checks["sections"][name] = {"status": record["status"],
                                    "passed": record["status"] == "ok" or skipped_for_dependency}
        if record.get("part") == "A":
            checks["parity"][name] = {row["name"]: {key: row.get(key) for key in (
                "dtype", "error_value", "tolerance", "passed", "bit_identical")} for row in record["rows"]
                if row.get("passed") is not None}
    verdicts = [c["passed"] for c in checks["sections"].values()] + [
        row["passed"] for rows in checks["parity"].values() for row in rows.values()]
    checks["passed"] = all(verdicts)
    return checks


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> list[str]:
    """Three tables: sections, parity (A), ratios (B)."""
    env, sections = report["environment"], report["sections"]
    title = (f"Device check on {env.get('device_name', env['device'])} ({'quick' if report['quick'] else 'full'}; "
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, {env['date'][:10]}).")
    status = [title, "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, record in sections.items():
        note = record.get("reason") or record.get("error") or ""
        status.append(f"| {name} | {record['status']} | {_number(record.get('seconds'))} | {note[:160]} |")
    parity = ["A. Parity against float64 on the CPU (error: max |x − ref| / max |ref| for logits and losses, "
              "‖x − ref‖ / ‖ref‖ for gradients; schedulers: max |ours − diffusers|).", "",
              "| check | dtype | error | tolerance | pass |", "|---|---|---|---|---|"]
    ratios = ["B. hf_ext beside its peers: ratios are hf_ext / peer (< 1: hf_ext takes less time or memory); "
              "peak = growth of allocated CUDA memory during one call.", "",
              "| comparison | size | hf_ext | peer | time × peer | peak × peer | goal | met |",
              "|---|---|---|---|---|---|---|---|"]
    for record in sections.values():
        for row in record.get("rows", []):
            if row["status"] != "ok":
                (parity if record["part"] == "A" else ratios).append(
                    f"| {row['name']} | {row['status']}: {(row.get('reason') or row.get('error') or '')[:120]} |")
            elif record["part"] == "A" and "check" in row:
                verdict = {True: "pass", False: "**FAIL**", None: "—"}[row.get("passed")]
                parity.append(f"| {row['check']} | {row['dtype']} | {_number(row.get('error_value'))} | "
                              f"{_number(row.get('tolerance'))} | {verdict} |")
            elif record["part"] == "B" and row.get("kind") == "growth":
                exponents = (row["loglog_exponent"], row["peer_loglog_exponent"])
                ratios.append(f"| {row['name']} | L = {row['lengths']} | exponent {exponents[0]:.2f} | exponent "
                              f"{exponents[1]:.2f} | — | — | {row['goal']} | {row['met']} |")
            elif record["part"] == "B":
                size = row.get("size") or row.get("tokens") or row.get("context") or ""
                peaks = [row.get(k) for k in ("candidate_peak_bytes", "peer_peak_bytes")]
                memory = " / ".join("—" if p is None else f"{p / 2**20:.0f} MiB" for p in peaks)
                ratios.append(f"| {row['name']} | {size} | {row['candidate']} | {row['peer']} | "
                              f"{row['time_ratio']:.3f} ({row['candidate_seconds'] * 1e3:.2f} / "
                              f"{row['peer_seconds'] * 1e3:.2f} ms) | {_number(row.get('memory_ratio'), 4)} ({memory}) "
                              f"| {row.get('goal') or '—'} | {_number(row.get('met'))} |")
    return ["\n".join(status), "\n".join(parity), "\n".join(ratios)]


def write_report(report: dict, final: bool = False) -> dict:
    """The harness result document (also written mid-run, with ``finished: false``) and device_check.md."""
    tables = markdown(report)
    result = make_result(NAME, candidate="hf_ext", peer="float64 CPU reference (A) / the peer named per row (B)",
                         settings=report["settings"], metrics=_harness_metrics(report["sections"]),
                         checks=_harness_checks(report["sections"]), quick=report["quick"])
    result.update(finished=final, total_seconds=round(time.monotonic() - report["started"], 1),
                  environment=report["environment"], sections=report["sections"], markdown_tables=tables)
    directory = Path(report["out"]) if report["out"] else results_dir(report["quick"])
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f"{NAME}.json.tmp"
    temporary.write_text(json.dumps(result, indent=2, default=str) + "\n")
    temporary.replace(directory / f"{NAME}.json")
    (directory / f"{NAME}.md").write_text("\n\n".join(tables) + "\n")
    if final:
        if not report["out"] and not report["quick"]:
            write_results_table(output_dir())
        log(f"results in {directory / NAME}.json and .md")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the CI and smoke mode")
    parser.add_argument("--out", help="folder for device_check.json/.md (default: benchmarks/results[/quick])")
    parser.add_argument("--budget-seconds", type=float, help="the global time budget (default: the settings')")
    parser.add_argument("--only", nargs="+", choices=SECTION_NAMES, metavar="SECTION", help="run these sections")
    arguments = parser.parse_args(argv)
    if arguments.device == "cuda" and not torch.cuda.is_available():  # every section will say so in the report
        log("WARNING: --device cuda, but torch sees no CUDA device here")
    settings = json.loads(json.dumps(QUICK if arguments.quick else FULL))  # a deep copy
    if arguments.budget_seconds is not None:
        settings["budget_seconds"] = arguments.budget_seconds
    return run(settings, quick=arguments.quick, device=arguments.device, out=arguments.out, only=arguments.only)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
