"""Scheduler step overhead: hf_ext's ReFlowScheduler and UDMScheduler against the diffusers schedulers they stand in
for, time per sampling run of one image (fp32, CPU, one torch thread unless ``HF_EXT_BENCH_THREADS`` says otherwise).

Only the scheduler is timed: a timed call is ``set_timesteps(N)`` and a ``step()`` at every entry of
``scheduler.timesteps`` (N calls, 2N − 1 for Heun) in the loop of the pipelines that use the pair, with a fake model
whose output is one fixed tensor. Pairs (ours vs diffusers): ReFlow-Euler vs FlowMatchEuler, ReFlow-Heun vs
FlowMatchHeun, UDM vs DDPM, UDM vs DDIM at η = 0 and 0.5; each on a ``tiny`` 1×4×8×8 sample (pure per-call Python
overhead) and an SD3/Flux ``latent`` 1×16×64×64, for N = 50 and 8. ``compare`` interleaves both sides; a timed call
repeats the run ``runs_per_call`` times, reported times are per run.

Goal: ``time_ratio = ours / diffusers <= 1.1`` for every row (``speed_ratio = 1 / time_ratio >= 0.909``). ``checks``
first run every pair from the same start and require the same final sample within 1e-5 (Heun: recorded only).

Run with ``python -m benchmarks.scheduler_step_overhead`` (1-2 minutes) or ``--quick`` (about 10 s: N = 50 only).
"""

import os
import statistics
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from hf_ext.schedulers import ReFlowScheduler, UDMScheduler

from .harness import THREADS_ENVIRONMENT_VARIABLE, compare, configure_threads, log, main, make_result, save_result
from .tasks.scheduler_loops import GENERATOR_SEED, SEED, SamplingRun, make_inputs

NAME = "scheduler_step_overhead"
DEFAULT_THREADS = 1
MAX_TIME_RATIO = 1.1  # ours <= 1.1 x diffusers' time per sampling run
MIN_SPEED_RATIO = 1 / MAX_TIME_RATIO  # the same goal as compare() states it (diffusers time / ours)
EQUALITY_TOLERANCE = 1e-5  # max |ours - diffusers| of the final samples, for the pairs that must agree

SIZES = {"tiny": [1, 4, 8, 8], "latent": [1, 16, 64, 64]}

# Rounds must be odd (time_ratio = 1 / speed_ratio is then exactly the median of the per-round ours / diffusers).
FULL = {"sizes": SIZES, "steps": [50, 8], "rounds": 41, "warmup": 3, "target_call_seconds": 0.02,
        "calibration_runs": 3}
QUICK = {"sizes": SIZES, "steps": [50], "rounds": 5, "warmup": 1, "target_call_seconds": 0.005,
         "calibration_runs": 1}


def _ddpm_pair():
    ddpm = DDPMScheduler()
    return UDMScheduler.from_config(ddpm.config, eta=1.0), ddpm


def _ddim_pair():
    ddim = DDIMScheduler()
    return UDMScheduler.from_config(ddim.config, use_clipped_model_output=False), ddim


# name -> factory of (candidate, peer), step keyword arguments, loop style, equality required, descriptions.
# Loop style "flow": SD3/Flux pipelines (no generator, return_dict=False); "ddpm": DDPMPipeline/DDIMPipeline
# (generator=g, .prev_sample).
PAIRS: dict[str, dict] = {
    "reflow_euler_vs_flow_match_euler": {
        "make": lambda: (ReFlowScheduler(), FlowMatchEulerDiscreteScheduler()), "step_kwargs": {}, "loop": "flow",
        "must_match": True, "candidate": "ReFlowScheduler()", "peer": "FlowMatchEulerDiscreteScheduler()"},
    "reflow_heun_vs_flow_match_heun": {
        "make": lambda: (ReFlowScheduler(solver="heun"), FlowMatchHeunDiscreteScheduler()), "step_kwargs": {},
        "loop": "flow", "must_match": False, "candidate": 'ReFlowScheduler(solver="heun")',
        "peer": "FlowMatchHeunDiscreteScheduler()"},
    "udm_vs_ddpm": {
        "make": _ddpm_pair, "step_kwargs": {}, "loop": "ddpm", "must_match": True,
        "candidate": "UDMScheduler.from_config(DDPMScheduler().config, eta=1.0)", "peer": "DDPMScheduler()"},
    "udm_vs_ddim_eta0": {
        "make": _ddim_pair, "step_kwargs": {"eta": 0.0}, "loop": "ddpm", "must_match": True,
        "candidate": "UDMScheduler.from_config(DDIMScheduler().config, use_clipped_model_output=False), "
                     "step(eta=0.0)", "peer": "DDIMScheduler(), step(eta=0.0)"},
    "udm_vs_ddim_eta0.5": {
        "make": _ddim_pair, "step_kwargs": {"eta": 0.5}, "loop": "ddpm", "must_match": True,
        "candidate": "UDMScheduler.from_config(DDIMScheduler().config, use_clipped_model_output=False), "
                     "step(eta=0.5)", "peer": "DDIMScheduler(), step(eta=0.5)"},
}


def make_runs(pair: str, shape: list[int], steps: int) -> tuple[SamplingRun, SamplingRun]:
    """(candidate, peer) sampling runs of ``pair`` on inputs of ``shape``, each with its own scheduler object."""
    spec = PAIRS[pair]
    candidate, peer = spec["make"]()
    initial, model_output = make_inputs(shape)
    return tuple(SamplingRun(scheduler, model_output, initial, steps, loop=spec["loop"],
                             step_kwargs=spec["step_kwargs"]) for scheduler in (candidate, peer))


def _schedule_difference(candidate, peer) -> dict:
    """How the two schedules (after a run) differ: lengths, largest timestep and σ difference where defined."""
    ours, theirs = candidate.scheduler.timesteps, peer.scheduler.timesteps
    record = {"candidate_step_calls": len(ours), "peer_step_calls": len(theirs)}
    if len(ours) == len(theirs):
        record["timesteps_equal"] = bool(torch.equal(ours.double(), theirs.double()))
        record["max_abs_timestep_diff"] = (ours.double() - theirs.double()).abs().max().item()
    ours_sigmas, theirs_sigmas = (getattr(run.scheduler, "sigmas", None) for run in (candidate, peer))
    if ours_sigmas is not None and theirs_sigmas is not None and len(ours_sigmas) == len(theirs_sigmas):
        record["max_abs_sigma_diff"] = (ours_sigmas.double() - theirs_sigmas.double()).abs().max().item()
    return record


def check_outputs(settings: dict) -> dict:
    """Run every pair once per size and N from the same start and compare the final samples (module docstring)."""
    checks = {"tolerance": EQUALITY_TOLERANCE, "pairs": {}}
    failures = []
    for pair, spec in PAIRS.items():
        for size, shape in settings["sizes"].items():
            for steps in settings["steps"]:
                candidate, peer = make_runs(pair, shape, steps)
                ours, theirs = candidate(), peer()
                difference = (ours.double() - theirs.double()).abs().max().item()
                record = {"max_abs_diff": difference, "max_abs_value": theirs.abs().max().item(),
                          "required": spec["must_match"],
                          "within_tolerance": bool(difference <= EQUALITY_TOLERANCE),
                          **_schedule_difference(candidate, peer)}
                checks["pairs"][f"{pair}_{size}_n{steps}"] = record
                if spec["must_match"] and not record["within_tolerance"]:
                    failures.append(f"{pair}_{size}_n{steps}")
    checks["failures"] = failures
    checks["passed"] = not failures
    checks["passed_means"] = (f"final samples within {EQUALITY_TOLERANCE:g} (max abs) for ReFlow-Euler vs "
                              "FlowMatchEuler, UDM vs DDPM and UDM vs DDIM (eta 0 and 0.5), same start, same fixed "
                              "model output, generators seeded alike; ReFlow-Heun vs FlowMatchHeun recorded only")
    return checks


def runs_per_call(run: SamplingRun, target_seconds: float, calibration_runs: int) -> int:
    """Sampling runs per timed call so that a call lasts about ``target_seconds`` (from ``run``'s median time)."""
    seconds = []
    for _ in range(calibration_runs):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return max(1, round(target_seconds / statistics.median(seconds)))


def time_pair(pair: str, size: str, shape: list[int], steps: int, settings: dict) -> dict:
    """One metric: ``compare`` of the candidate's and the peer's sampling runs, with the goal and per-run times."""
    spec = PAIRS[pair]
    candidate, peer = make_runs(pair, shape, steps)
    candidate(), peer()  # first calls (lazy set-up) before the calibration
    runs = runs_per_call(peer, settings["target_call_seconds"], settings["calibration_runs"])
    metric = compare(candidate.repeated(runs), peer.repeated(runs), work=runs, unit="runs/s",
                     repeats=settings["rounds"], warmup=settings["warmup"], min_speed_ratio=MIN_SPEED_RATIO,
                     description=f"set_timesteps({steps}) + {len(peer.scheduler.timesteps)} step() calls, "
                                 f"{'x'.join(map(str, shape))} fp32, fixed model output: {spec['candidate']} vs "
                                 f"diffusers {spec['peer']}")
    candidate_run = metric["candidate_median_seconds"] / runs
    peer_run = metric["peer_median_seconds"] / runs
    metric.update({
        "goal": f"time_ratio (ours / diffusers) <= {MAX_TIME_RATIO}, i.e. speed_ratio >= {MIN_SPEED_RATIO:.3f}",
        "time_ratio": 1 / metric["speed_ratio"], "max_time_ratio": MAX_TIME_RATIO,
        "pair": pair, "size": size, "shape": list(shape), "steps": steps,
        "candidate_step_calls": len(candidate.scheduler.timesteps), "peer_step_calls": len(peer.scheduler.timesteps),
        "runs_per_call": runs, "candidate_seconds_per_run": candidate_run, "peer_seconds_per_run": peer_run,
        "candidate_seconds_per_step_call": candidate_run / len(candidate.scheduler.timesteps),
        "peer_seconds_per_step_call": peer_run / len(peer.scheduler.timesteps),
    })
    return metric


def run(settings: dict, quick: bool = False) -> dict:
    """The output checks, then every pair × size × N timed."""
    started = time.perf_counter()
    if settings["rounds"] % 2 == 0:
        raise ValueError("rounds must be odd (time_ratio is then the median of the per-round ratios)")
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(DEFAULT_THREADS)  # single-threaded Python overhead (about/scheduler_step_overhead.md)
    threads = configure_threads()
    settings.update({
        "threads": threads, "dtype": "float32", "device": "cpu",
        "model_output": f"one fixed N(0, 1) tensor (seed {SEED}) passed to every step; the initial sample is "
                        "another, shared by both sides",
        "timed_call": "runs_per_call x (set_timesteps(N) + step() at every scheduler.timesteps); schedulers built "
                      "once, outside the timing",
        "generator_seed": GENERATOR_SEED,
        "pairs": {name: {"candidate": spec["candidate"], "peer": spec["peer"], "loop": spec["loop"],
                         "step_kwargs": spec["step_kwargs"], "equality_required": spec["must_match"]}
                  for name, spec in PAIRS.items()},
        "max_time_ratio": MAX_TIME_RATIO,
    })
    log(f"{threads} thread(s); sizes {settings['sizes']}, N = {settings['steps']}")

    section_start = time.perf_counter()
    checks = check_outputs(settings)
    sections = {"checks": time.perf_counter() - section_start}
    for name, record in checks["pairs"].items():
        log(f"check {name}: max |diff| {record['max_abs_diff']:.3g}"
            + ("" if record["required"] else " (informational)"))
    if not checks["passed"]:
        log(f"WARNING: outputs differ by more than {EQUALITY_TOLERANCE:g}: {checks['failures']}")

    section_start = time.perf_counter()
    metrics = {}
    for size, shape in settings["sizes"].items():
        for steps in settings["steps"]:
            for pair in PAIRS:
                metric_name = f"{pair}_{size}_n{steps}"
                metrics[metric_name] = row = time_pair(pair, size, shape, steps, settings)
                log(f"{metric_name}: ours {row['candidate_seconds_per_run'] * 1e3:.3f} ms, diffusers "
                    f"{row['peer_seconds_per_run'] * 1e3:.3f} ms per run, time_ratio {row['time_ratio']:.3f} "
                    f"(goal <= {MAX_TIME_RATIO})")
    sections["timing"] = time.perf_counter() - section_start

    result = make_result(NAME, candidate="hf_ext ReFlowScheduler / UDMScheduler (per metric)",
                         peer="diffusers FlowMatchEuler / FlowMatchHeun / DDPM / DDIM scheduler (per metric)",
                         settings=settings, metrics=metrics, checks=checks, quick=quick)
    result["tables"] = {"sections_seconds": sections, "total_seconds": time.perf_counter() - started}
    result["markdown_tables"] = [markdown_table(metrics, threads)]
    log(result["markdown_tables"][0])
    save_result(result)
    log(f"total {result['tables']['total_seconds']:.0f} s")
    return result


def markdown_table(metrics: dict, threads: int) -> str:
    """One row per timed metric: times per run and per step() call, the time ratio and its verdict."""
    rows = [f"Scheduler time per sampling run (set_timesteps(N) + every step(), fixed model output, fp32, {threads} "
            "thread(s)); median over interleaved rounds. time ratio = ours / diffusers (goal ≤ "
            f"{MAX_TIME_RATIO}); per call = time per run / step() calls.", "",
            "| pair | sample | N | step() calls | ours per run | diffusers per run | ours per call | "
            "diffusers per call | time ratio | pass |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for row in metrics.values():
        rows.append(
            f"| {row['pair']} | {'×'.join(map(str, row['shape']))} | {row['steps']} | {row['candidate_step_calls']} | "
            f"{row['candidate_seconds_per_run'] * 1e3:.3f} ms | {row['peer_seconds_per_run'] * 1e3:.3f} ms | "
            f"{row['candidate_seconds_per_step_call'] * 1e6:.1f} µs | {row['peer_seconds_per_step_call'] * 1e6:.1f} µs"
            f" | {row['time_ratio']:.3f} | {'pass' if row['passed'] else '**FAIL**'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
