"""Rectified flow and reflow on a 2-D mixture of 8 Gaussians, with a picture of the ODE paths and one-step samples.

    python -m examples.reflow_2d [--training-steps N] [--pairs N] [--output-dir DIR]

1-rectified flow (1-RF) is trained from data with independent noise; its ODE paths curve, so one Euler step lands
near the mean of the data. Reflow (2-RF) retrains it on its own (noise, sample) pairs: the paths straighten and one
step is nearly as good as many. Distances are sliced Wasserstein to fresh data (two independent data samples of the
same size are `data_floor` apart). The data, the velocity model and the distance come from the repository's
benchmarks/tasks, so run it from a checkout. The picture needs matplotlib (`pip install 'hf-ext[plot]'`).
"""

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.tasks.distances import sliced_wasserstein
from benchmarks.tasks.toy2d import VelocityMLP, eight_gaussians
from hf_ext.diffusion import (FlowTrainingArguments, generate_reflow_pairs, solve_flow, straightness,
                              train_rectified_flow, train_reflow)


def plot(flows: dict, noise: torch.Tensor, target: torch.Tensor, path: Path) -> Path | None:
    """For each flow: its ODE paths (32 Euler steps) and its samples after one step, over the data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'hf-ext[plot]'): no picture")
        return None
    figure, axes = plt.subplots(1, 2 * len(flows), figsize=(8 * len(flows), 4.2))
    for row, (name, model) in enumerate(flows.items()):
        paths = torch.stack(solve_flow(model, noise[:60], 32, return_trajectory=True).trajectory)
        left, right = axes[2 * row], axes[2 * row + 1]
        left.scatter(*target.T, s=2, c="lightgray")
        left.plot(paths[..., 0], paths[..., 1], lw=0.6, alpha=0.7)
        left.set_title(f"{name}: ODE paths (32 Euler steps)")
        right.scatter(*target.T, s=2, c="lightgray", label="data")
        right.scatter(*solve_flow(model, noise, 1).samples.T, s=3, c="tab:red", label="1 step")
        right.set_title(f"{name}: samples after one Euler step")
        right.legend(loc="lower right", markerscale=3)
    for ax in axes:
        ax.set(xlim=(-6.5, 6.5), ylim=(-6.5, 6.5), aspect="equal")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-steps", type=int, default=1500, help="for each of 1-RF and 2-RF")
    parser.add_argument("--pairs", type=int, default=10_000, help="training samples, and reflow pairs")
    parser.add_argument("--output-dir", default="reflow_2d_output")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(options.seed)
    data = eight_gaussians(options.pairs, generator=torch.Generator().manual_seed(options.seed))
    args = FlowTrainingArguments(max_steps=options.training_steps, learning_rate=2e-3, lr_scheduler_type="cosine",
                                 seed=options.seed)
    flows = {"1-RF": train_rectified_flow(VelocityMLP(), data, args).model}
    pairs = generate_reflow_pairs(flows["1-RF"], options.pairs, (2,), num_inference_steps=32)
    flows["2-RF"] = train_reflow(copy.deepcopy(flows["1-RF"]), pairs, args).model

    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(options.seed + 1))
    target = eight_gaussians(2000, generator=torch.Generator().manual_seed(options.seed + 2))
    fresh = eight_gaussians(2000, generator=torch.Generator().manual_seed(options.seed + 3))
    report = {"data_floor": sliced_wasserstein(fresh, target)}
    for name, model in flows.items():
        report[name] = {"straightness": straightness(model, noise),
                        "distance_by_steps": {n: sliced_wasserstein(solve_flow(model, noise, n).samples, target)
                                              for n in (1, 2, 32)}}
        distances = "  ".join(f"{n} step(s) {d:.3f}" for n, d in report[name]["distance_by_steps"].items())
        print(f"{name}: straightness {report[name]['straightness']:.4f}; distance to data after {distances}")
    print(f"data vs data: {report['data_floor']:.3f}")
    picture = plot(flows, noise[:400], target, output / "reflow_2d.png")
    report["picture"] = str(picture) if picture else None
    if picture:
        print(f"picture: {picture}")
    return report


if __name__ == "__main__":
    main()
