"""Reflow quality: how close to the data are 1-RF, 2-RF, 2-RF + distillation and DDIM after 1, 2, …, 32 steps?

On two data sets (8 Gaussians in 2-D; scikit-learn's 8×8 digits) one network with one set of initial weights is trained
as a 1-rectified flow (`train_rectified_flow`), as an ε-prediction model sampled by DDIM (`UDMScheduler`, η = 0, the
same budget), as a 2-rectified flow (`train_reflow` on 1-RF's pairs) and as 2-RF distilled to one step (`distill`).
Every method starts from the same noise and takes N steps, N model evaluations per sample. Distances to the data,
lower is better: 8 Gaussians the sliced 2-Wasserstein distance (SW); digits a classifier-feature Fréchet distance (FD,
FID-like) and pixel-space MMD². ``floors`` are what real samples score with the same sample sizes. Straightness at the
largest N: Liu et al.'s S (flows; 0 = straight) and path length / chord (1 = straight).

Goal (the rectified-flow paper's claim), per data set with D its headline distance (SW, FD) and R =
``reference_steps``: D(2-RF, 1), D(2-RF, 2) and D(2-RF + distill, 1) each ≤ 1.5 · D(1-RF, R). A metric's ratio is
D(peer) / D(candidate): > 1 means the candidate is closer to the data. ``checks`` record that UDM reproduces diffusers'
DDIMScheduler bit for bit on the ε-model.

Run with ``python -m benchmarks.reflow_quality`` (about 16 minutes on 2 CPU cores with one torch thread) or
``--quick`` (tiny models, seconds: a smoke test, not a measurement).
"""

import math
import os
import time

import torch

from hf_ext.diffusion import solve_flow, straightness

from .harness import (THREADS_ENVIRONMENT_VARIABLE, configure_threads, informational_metric, log, main, make_result,
                      save_result)
from .tasks.distances import path_length_ratio
from .tasks.reflow_models import ddim_check, make_schedulers, sample_epsilon_model, train_models
from .tasks.reflow_report import jsonable_evaluation, markdown_tables, plot
from .tasks.reflow_tasks import FLOW_METHODS, METHODS, TASK_LABELS, Task, digits_task, toy_task

NAME = "reflow_quality"
CANDIDATE = "hf_ext.diffusion 2-rectified flow (train_reflow; + distill to one step where named)"
PEER = "1-rectified flow (train_rectified_flow), or the row named in the metric"

FULL = {
    "tasks": ("toy", "digits"),
    "seed": 0,
    "steps": (1, 2, 4, 8, 16, 32),  # sampling steps = NFE per sample
    "reference_steps": 16,  # the 1-RF step count the goal compares with
    "goal_factor": 1.5,
    "plot_steps": (1, 2, 32),  # 2-D sample panels (the digit grids use the first and the last)
    "epsilon_scheduler": {"num_train_timesteps": 1024, "beta_schedule": "linear", "beta_start": 1e-4,
                          "beta_end": 0.02, "timestep_spacing": "trailing"},
    "toy": {
        "train_samples": 100_000,
        "eval_samples": 20_000,
        "floor_draws": 3,
        "model": {"hidden_size": 256, "num_layers": 3, "time_embedding_dim": 64},
        "batch_size": 512,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        # The learning rate stays constant after warm-up (FlowTrainingArguments has no decay) and the final iterate is
        # used (no EMA): 1-RF's SW at 32 steps was 0.17-0.18 with 5e-4 and 0.24-0.41 with 1e-3 / 2e-3 (3000-4000 steps).
        "rf": {"max_steps": 3000, "learning_rate": 5e-4, "warmup_steps": 100},
        "reflow": {"max_steps": 3000, "learning_rate": 5e-4, "warmup_steps": 100},
        "distill": {"max_steps": 1500, "learning_rate": 3e-4, "warmup_steps": 0},
        "pairs": 30_000,
        "pair_steps": 64,
        "distill_pair_steps": 32,
        "ddim_check_samples": 20_000,
        "trajectories": 256,
        "plot_samples": 3000,
    },
    "digits": {
        "held_out": 597,
        "model": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
                  "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")},
        "batch_size": 128,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "rf": {"max_steps": 2500, "learning_rate": 2e-3, "warmup_steps": 100},
        "reflow": {"max_steps": 2500, "learning_rate": 1e-3, "warmup_steps": 100},
        "distill": {"max_steps": 800, "learning_rate": 3e-4, "warmup_steps": 0},
        "pairs": 6000,
        "pair_steps": 32,
        "distill_pair_steps": 16,
        "classifier": {"width": 32, "features": 64, "epochs": 30, "batch_size": 64, "learning_rate": 1e-3},
        "ddim_check_samples": 256,
        "grid_samples": 40,
    },
}
QUICK = {
    **FULL,
    "steps": (1, 2, 4),
    "reference_steps": 4,
    "plot_steps": (1, 2, 4),
    "toy": {
        **FULL["toy"],
        "train_samples": 2000,
        "eval_samples": 512,
        "floor_draws": 2,
        "model": {"hidden_size": 32, "num_layers": 2, "time_embedding_dim": 16},
        "batch_size": 64,
        "rf": {"max_steps": 40, "learning_rate": 2e-3, "warmup_steps": 5},
        "reflow": {"max_steps": 30, "learning_rate": 1e-3, "warmup_steps": 5},
        "distill": {"max_steps": 20, "learning_rate": 3e-4, "warmup_steps": 0},
        "pairs": 512,
        "pair_steps": 4,
        "distill_pair_steps": 2,
        "ddim_check_samples": 128,
        "trajectories": 32,
        "plot_samples": 256,
    },
    "digits": {
        **FULL["digits"],
        "held_out": 100,
        "model": {**FULL["digits"]["model"], "block_out_channels": (8, 16), "norm_num_groups": 4},
        "batch_size": 16,
        "rf": {"max_steps": 6, "learning_rate": 2e-3, "warmup_steps": 2},
        "reflow": {"max_steps": 4, "learning_rate": 1e-3, "warmup_steps": 2},
        "distill": {"max_steps": 3, "learning_rate": 3e-4, "warmup_steps": 0},
        "pairs": 64,
        "pair_steps": 2,
        "distill_pair_steps": 2,
        "classifier": {**FULL["digits"]["classifier"], "width": 8, "features": 16, "epochs": 1},
        "ddim_check_samples": 32,
        "grid_samples": 20,
    },
}


def draw(method: str, models: dict, udm, noise: torch.Tensor, num_steps: int, trajectory: bool = False):
    """(samples, trajectory or None) of one method from ``noise`` in ``num_steps`` Euler or DDIM/UDM steps."""
    if method == "ddim":
        return sample_epsilon_model(models["ddim"], udm, noise, num_steps, trajectory)
    solution = solve_flow(models[method], noise, num_steps, "euler", return_trajectory=trajectory)
    return solution.samples, solution.trajectory


def evaluate(task: Task, models: dict, udm, settings: dict, keep: int) -> dict:
    """Every method at every N: distances, NFE, the kept samples for the plot, straightness at the largest N."""
    noise = torch.randn((task.eval_samples, *task.sample_shape),
                        generator=torch.Generator().manual_seed(settings["seed"] + 1000))
    largest = max(settings["steps"])
    keep_steps = set(settings["plot_steps"]) | {min(settings["steps"]), largest}
    results = {}
    for method in METHODS:
        started = time.perf_counter()
        record = {"label": METHODS[method], "distance": {}, "nfe": {}, "samples": {}}
        for num_steps in settings["steps"]:
            samples, states = draw(method, models, udm, noise, num_steps, trajectory=num_steps == largest)
            record["distance"][num_steps] = task.distance(samples)
            record["nfe"][num_steps] = num_steps  # one model call per Euler / DDIM step
            record["finite"] = record.get("finite", True) and bool(torch.isfinite(samples).all())
            if num_steps in keep_steps:
                record["samples"][num_steps] = samples[:keep]
            if states is not None:
                record["path_length_ratio"] = path_length_ratio(states)
                record["trajectory_head"] = torch.stack([state[:keep] for state in states])
        record["straightness"] = (straightness(models[method], noise, largest) if method in FLOW_METHODS else None)
        record["seconds"] = time.perf_counter() - started
        results[method] = record
        log(f"  {METHODS[method]:<20} " + "  ".join(
            f"{n}: {record['distance'][n][task.headline]:.4g}" for n in settings["steps"])
            + f"  | S {record['straightness'] if record['straightness'] is None else round(record['straightness'], 5)}"
            + f", path/chord {record['path_length_ratio']:.4f} ({record['seconds']:.0f} s)")
    return results


def _distance_metric(description: str, unit: str, candidate: float, peer: float, factor: float | None,
                     floor: float) -> dict:
    ratio = peer / candidate if candidate > 0 else math.inf
    return {
        "description": description,
        "unit": unit,
        "candidate": candidate,
        "peer": peer,
        # RESULTS.md renders this field as the ratio column; here it is a ratio of distances, not a speed.
        "speed_ratio": ratio,
        "ratio_definition": "peer distance / candidate distance; > 1 means the candidate is closer to the data",
        "floor": floor,
        "goal": None if factor is None else f"candidate ≤ {factor:g} × peer (ratio ≥ {1 / factor:.3f})",
        "min_speed_ratio": None if factor is None else 1 / factor,
        "passed": None if factor is None else bool(candidate <= factor * peer),
    }


def task_metrics(task: Task, evaluation: dict, settings: dict) -> dict:
    label, key, reference_steps = TASK_LABELS[task.key], task.headline, settings["reference_steps"]
    unit = {"sw": "SW", "fd": "FD"}[key]
    floor = task.floors[key]
    d = {method: {n: r["distance"][n][key] for n in r["distance"]} for method, r in evaluation.items()}
    one, two = min(settings["steps"]), sorted(settings["steps"])[1]
    factor = settings["goal_factor"]
    peer = d["rf1"][reference_steps]
    metrics = {}

    def add(name, description, candidate, peer_value, goal):
        metrics[f"{label}: {unit}, {name}"] = _distance_metric(description, unit, candidate, peer_value,
                                                               factor if goal else None, floor)

    rf1_ref = f"1-RF at {reference_steps} steps"
    add(f"2-RF {one} step vs {rf1_ref}", f"{unit} to the data of 2-RF sampled with {one} Euler step ({one} NFE) vs "
        f"1-RF with {reference_steps} ({reference_steps} NFE)", d["rf2"][one], peer, True)
    add(f"2-RF {two} steps vs {rf1_ref}", f"{unit} of 2-RF with {two} Euler steps vs 1-RF with {reference_steps}",
        d["rf2"][two], peer, True)
    add(f"2-RF + distill {one} step vs {rf1_ref}", f"{unit} of 2-RF distilled to one step (distill, num_steps=1) "
        f"vs 1-RF with {reference_steps} steps", d["rf2_distill"][one], peer, True)
    add(f"1-RF {one} step vs {rf1_ref}", f"{unit} of 1-RF with {one} step vs with {reference_steps} "
        "(what reflow has to fix)", d["rf1"][one], peer, False)
    add(f"DDIM {one} step vs {rf1_ref}", f"{unit} of the ε-model with {one} DDIM/UDM step vs 1-RF with "
        f"{reference_steps}", d["ddim"][one], peer, False)
    add(f"DDIM {reference_steps} steps vs {rf1_ref}", f"{unit} of the ε-model with {reference_steps} DDIM/UDM steps "
        f"vs 1-RF with {reference_steps} (same network and training budget)", d["ddim"][reference_steps], peer, False)
    add(f"2-RF {one} step vs DDIM {one} step", f"{unit} of 2-RF vs the ε-model (DDIM), one step each",
        d["rf2"][one], d["ddim"][one], False)
    s1, s2 = evaluation["rf1"]["straightness"], evaluation["rf2"]["straightness"]
    metrics[f"{label}: straightness S, 2-RF vs 1-RF"] = informational_metric(
        f"Liu et al.'s straightness S (hf_ext.diffusion.straightness, {max(settings['steps'])} Euler steps, per "
        "dimension); 0 = straight paths", "S", s2, s1, s1 / s2 if s2 > 0 else math.inf,
        "1-RF S / 2-RF S; > 1 means 2-RF is straighter")
    return metrics


def run(settings: dict, quick: bool = False) -> dict:
    """Both data sets (``settings["tasks"]``): train, sample, score."""
    started = time.perf_counter()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        torch.set_num_threads(1)  # one thread unless asked otherwise (about/reflow_quality.md)
    settings.update({"threads": configure_threads(), "device": "cpu", "dtype": "float32"})
    unknown = set(settings["tasks"]) - set(TASK_LABELS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {list(TASK_LABELS)}")
    if settings["reference_steps"] not in settings["steps"] or len(settings["steps"]) < 2:
        raise ValueError("steps needs at least two entries, reference_steps among them")
    udm, _ = make_schedulers(settings["epsilon_scheduler"])
    sections, evaluations, tasks, tables, metrics, checks, task_tables = {}, {}, {}, [], {}, {}, {}
    for key in settings["tasks"]:
        section_start = time.perf_counter()
        config = settings[key]
        log(f"{TASK_LABELS[key]}:")
        task = toy_task(config, settings["seed"]) if key == "toy" else digits_task(config, settings["seed"])
        tasks[key] = task
        log(f"  floors: { {k: v for k, v in task.floors.items() if not isinstance(v, list)} }"
            + (f"; classifier held-out accuracy {task.report['classifier']['held_out_accuracy']:.4f}"
               if key == "digits" else ""))
        models, training = train_models(task, config, settings, udm)
        keep = max(config.get("plot_samples", 0), config.get("grid_samples", 0), config.get("trajectories", 0))
        evaluation = evaluate(task, models, udm, settings, keep)
        evaluations[key] = evaluation
        check_noise = torch.randn((min(config["ddim_check_samples"], task.eval_samples), *task.sample_shape),
                                  generator=torch.Generator().manual_seed(settings["seed"] + 1000))
        checks[key] = {
            "ddim_vs_udm": ddim_check(models["ddim"], settings["epsilon_scheduler"], check_noise, settings["steps"]),
            "all_finite": all(r["finite"] for r in evaluation.values())
            and all(training[m]["finite"] for m in METHODS),
        }
        log(f"  DDIM vs UDM: identical {checks[key]['ddim_vs_udm']['identical']}, UDM default within 1e-4: "
            f"{checks[key]['ddim_vs_udm']['udm_default_within_1e-4']}")
        metrics.update(task_metrics(task, evaluation, settings))
        tables += markdown_tables(task, evaluation, training, checks[key], settings)
        report = {k: v for k, v in task.report.items() if not isinstance(v, torch.Tensor)}
        task_tables[key] = {"headline_distance": task.headline, "floors": task.floors, "data": report,
                            "eval_samples": task.eval_samples, "training": training,
                            "methods": jsonable_evaluation(evaluation)}
        sections[key] = time.perf_counter() - section_start
        log(f"  {TASK_LABELS[key]} done in {sections[key]:.0f} s")

    result = make_result(NAME, candidate=CANDIDATE, peer=PEER, settings=settings, metrics=metrics, checks=checks,
                         quick=quick)
    result["goal_definition"] = (
        f"per data set, D = its headline distance (8 Gaussians: SW, digits: FD); passed iff D(2-RF, 1 step), "
        f"D(2-RF, 2 steps) and D(2-RF + distill, 1 step) are each ≤ {settings['goal_factor']} × D(1-RF, "
        f"{settings['reference_steps']} steps)")
    result["tables"] = {
        "units": "distances to the data (lower is better); keys of distance/nfe are sampling steps; S: Liu et al.'s "
                 "straightness; path_length_ratio: trajectory length / end-to-end distance",
        **task_tables,
    }
    result["markdown_tables"] = tables
    figure = plot(evaluations, tasks, settings)
    sections["total"] = time.perf_counter() - started
    result["sections_seconds"] = sections
    result["total_seconds"] = sections["total"]
    for table in tables:
        log("\n" + table)
    save_result(result, figure)
    log(f"{result['total_seconds']:.0f} s in all")
    return result


if __name__ == "__main__":
    main()
