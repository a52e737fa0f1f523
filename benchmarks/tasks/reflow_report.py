"""The report of ``reflow_quality``: its markdown tables (distance per method and step count, straightness,
training cost, the DDIM check) and its figure (distance vs steps, 2-D samples and trajectories, digit grids)."""

import math

import numpy as np
import torch

from ..harness import pyplot
from .reflow_tasks import METHODS, TASK_LABELS, Task


def markdown_tables(task: Task, evaluation: dict, training: dict, checks: dict, settings: dict) -> list[str]:
    """One table per distance of ``task`` (the first with straightness and training cost), the DDIM check below."""
    label, steps = TASK_LABELS[task.key], settings["steps"]
    keys = ["sw"] if task.key == "toy" else ["fd", "mmd"]
    names = {"sw": "sliced 2-Wasserstein distance (SW)", "fd": "classifier-feature Fréchet distance (FD, FID-like)",
             "mmd": "pixel-space MMD² (×10³)"}
    scale = {"sw": 1.0, "fd": 1.0, "mmd": 1e3}
    tables = []
    for index, key in enumerate(keys):
        floor = task.floors[key] * scale[key]
        lines = [
            f"**{label}: {names[key]}** to the data vs sampling steps (NFE per sample = steps for every row: one model "
            f"call per Euler or DDIM step); floor (real vs real, same sample sizes): **{floor:.4g}**. "
            + ("S: Liu et al.'s straightness (flows); path/chord: trajectory length / end-to-end distance at "
               f"{max(steps)} steps. Training: steps × batch, seconds (2-RF and distill also paid for their pairs)."
               if index == 0 else ""),
            "",
            "| method | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in steps)
            + (" | S | path/chord | training |" if index == 0 else " |"),
            "|---|" + "---|" * len(steps) + ("---|---|---|" if index == 0 else ""),
        ]
        for method, record in evaluation.items():
            cells = [f"{record['distance'][n][key] * scale[key]:.4g}" for n in steps]
            row = f"| {record['label']} | " + " | ".join(cells)
            if index == 0:
                straight = "—" if record["straightness"] is None else f"{record['straightness']:.4g}"
                train = training[method]
                cost = f"{train['steps']}×{train['batch_size']}, {train['seconds']:.0f} s"
                if method in ("rf2", "rf2_distill"):
                    pairs = training[f"{method}_pairs"]
                    cost += f" (+ {pairs['pairs']} pairs × {pairs['nfe_per_pair']} NFE, {pairs['seconds']:.0f} s)"
                row += f" | {straight} | {record['path_length_ratio']:.4f} | {cost}"
            lines.append(row + " |")
        tables.append("\n".join(lines))
    check = checks["ddim_vs_udm"]
    worst = max(r["udm_default_max_relative_diff"] for r in check["per_steps"].values())
    extra = (f"DDIM check ({check['samples']} samples, every N): diffusers DDIMScheduler vs UDMScheduler η=0 — "
             f"bit-identical (UDM from DDIM's config): **{check['identical']}**; the table's UDM sampler differs by "
             f"at most {worst:.2g} (relative).")
    if task.key == "digits":
        classifier = task.report["classifier"]
        extra += (f" Classifier held-out accuracy {100 * classifier['held_out_accuracy']:.1f} %; "
                  f"{task.report['train_images']} training / {task.report['held_out_images']} held-out images.")
    else:
        extra += f" SW floor over {len(task.floors['sw_draws'])} independent draws: " + ", ".join(
            f"{v:.4f}" for v in task.floors["sw_draws"]) + f" ({task.eval_samples} points each)."
    tables[-1] += "\n\n" + extra
    return tables


def plot(evaluations: dict, tasks: dict, settings: dict):
    """Distance vs steps, 2-D samples and trajectories, digit sample grids: one figure (None without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return None
    methods = list(METHODS)
    plot_steps = list(settings["plot_steps"])
    digit_steps = [min(settings["steps"]), max(settings["steps"])]
    rows = 1 + (len(plot_steps) if "toy" in evaluations else 0) + (len(digit_steps) if "digits" in evaluations else 0)
    columns = len(methods) + 1
    heights = [1.0] * (rows - (len(digit_steps) if "digits" in evaluations else 0))
    heights += [0.6] * (rows - len(heights))  # the digit grids are 10 wide and 4 high
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.5 * sum(heights)), squeeze=False,
                                gridspec_kw={"height_ratios": heights})
    colors = dict(zip(methods, plt.get_cmap("tab10").colors))

    # Row 0: distance vs steps per data set, then 1-RF / 2-RF trajectories.
    curve_axes = list(axes[0])
    panels = [(key, distance) for key in ("toy", "digits") if key in evaluations
              for distance in (["sw"] if key == "toy" else ["fd", "mmd"])]
    for axis, (key, distance) in zip(curve_axes, panels):
        for method in methods:
            record = evaluations[key][method]
            values = [record["distance"][n][distance] for n in settings["steps"]]
            axis.plot(settings["steps"], values, marker="o", color=colors[method], label=record["label"])
        axis.axhline(tasks[key].floors[distance], color="black", linestyle="--", linewidth=1, label="floor (real)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("steps (= NFE)")
        axis.set_title(f"{TASK_LABELS[key]}: {distance.upper()}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    used = len(panels)
    if "toy" in evaluations:
        for axis, method in zip(curve_axes[used : used + 2], ("rf1", "rf2")):
            lines = evaluations["toy"][method]["trajectory_head"][:, : settings["toy"]["trajectories"]].numpy()
            axis.plot(lines[:, :, 0], lines[:, :, 1], color=colors[method], linewidth=0.5, alpha=0.6)
            axis.scatter(lines[0, :, 0], lines[0, :, 1], s=3, color="grey", label="noise")
            axis.scatter(lines[-1, :, 0], lines[-1, :, 1], s=3, color="black", label="sample")
            axis.set_title(f"8 Gaussians: {METHODS[method]} trajectories ({max(settings['steps'])} steps)")
            axis.set_xlim(-6, 6)
            axis.set_ylim(-6, 6)
            axis.set_aspect("equal")
        used += 2
    for axis in curve_axes[used:]:
        axis.axis("off")

    row = 1
    if "toy" in evaluations:
        reference = tasks["toy"].report["reference"][: settings["toy"]["plot_samples"]].numpy()
        for num_steps in plot_steps:
            for column, method in enumerate(methods):
                axis = axes[row][column]
                points = evaluations["toy"][method]["samples"][num_steps].numpy()
                axis.scatter(points[:, 0], points[:, 1], s=1, color=colors[method])
                sw = evaluations["toy"][method]["distance"][num_steps]["sw"]
                axis.set_title(f"{METHODS[method]}, {num_steps} step{'s' if num_steps > 1 else ''}: SW {sw:.3f}",
                               fontsize=9)
                axis.set_xlim(-6, 6)
                axis.set_ylim(-6, 6)
                axis.set_aspect("equal")
            axis = axes[row][len(methods)]
            if num_steps == plot_steps[0]:
                axis.scatter(reference[:, 0], reference[:, 1], s=1, color="black")
                axis.set_title(f"8 Gaussians: data (floor SW {tasks['toy'].floors['sw']:.3f})", fontsize=9)
                axis.set_xlim(-6, 6)
                axis.set_ylim(-6, 6)
                axis.set_aspect("equal")
            else:
                axis.axis("off")
            row += 1
    if "digits" in evaluations:
        count = settings["digits"]["grid_samples"]
        real = tasks["digits"].report["held"]
        for num_steps in digit_steps:
            for column, method in enumerate(methods):
                images = evaluations["digits"][method]["samples"][num_steps][:count]
                axes[row][column].imshow(grid(images), cmap="gray_r", vmin=-1, vmax=1)
                fd = evaluations["digits"][method]["distance"][num_steps]["fd"]
                axes[row][column].set_title(f"{METHODS[method]}, {num_steps} step{'s' if num_steps > 1 else ''}: "
                                            f"FD {fd:.3g}", fontsize=9)
                axes[row][column].axis("off")
            axis = axes[row][len(methods)]
            if num_steps == digit_steps[0]:
                axis.imshow(grid(real[:count]), cmap="gray_r", vmin=-1, vmax=1)
                axis.set_title(f"digits: held-out real (floor FD {tasks['digits'].floors['fd']:.3g})", fontsize=9)
            axis.axis("off")
            row += 1
    figure.suptitle("Rectified flow vs reflow vs DDIM: quality against sampling steps (same noise for every method)")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.5 * sum(heights))))
    return figure


def grid(images: torch.Tensor, columns: int = 10) -> np.ndarray:
    """[n, 1, 8, 8] images in [-1, 1] → one array, ``columns`` wide, 1-pixel gaps."""
    images = images.clamp(-1, 1)[:, 0].numpy()
    rows = math.ceil(len(images) / columns)
    canvas = np.full((rows * 9 + 1, columns * 9 + 1), -1.0)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        canvas[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = image
    return canvas


def jsonable_evaluation(evaluation: dict) -> dict:
    """``evaluate``'s records without tensors, step counts as string keys (the result document's ``methods``)."""
    return {method: {"label": r["label"], "finite": r["finite"], "seconds": r["seconds"],
                     "straightness": r["straightness"], "path_length_ratio": r["path_length_ratio"],
                     "nfe": {str(n): v for n, v in r["nfe"].items()},
                     "distance": {str(n): v for n, v in r["distance"].items()}}
            for method, r in evaluation.items()}
