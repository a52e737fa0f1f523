"""Reflow quality: how close to the data are 1-RF, 2-RF, 2-RF + distillation and DDIM after 1, 2, …, 32 steps?

The rectified-flow paper's (Liu et al. 2023) qualitative claim: reflow straightens the flow's paths, so the
2-rectified flow sampled with one or two Euler steps is about as good as the 1-rectified flow with many steps, and a
distillation into one step closes the rest of the gap. This benchmark measures that with `hf_ext.diffusion` on two
data sets:

* **8 Gaussians** (`hf_ext.diffusion.eight_gaussians`, radius 4, std 0.25; 2-D): `VelocityMLP` (256 wide, 3 hidden
  layers), trained on ``train_samples`` points; distance: sliced 2-Wasserstein (`sliced_wasserstein`, 256
  projections) between ``eval_samples`` generated points and as many fresh points of the true distribution. SW here
  is dominated by the mixture weights (a mode with 2 % too much mass moves that mass across a gap of several units,
  and the sampling error of the weights shrinks only like n^-¼ in SW), so the floor varies between draws and 1-RF's
  own distance depends on where training stopped (see the learning-rate note in `FULL`); 2-RF and its
  distillation inherit 1-RF's weights through the reflow pairs (and every row uses the same noise), so the
  comparisons between the flow rows are tighter than their distance to the floor suggests.
* **Digits** (scikit-learn's 8×8 ``load_digits``, 1797 images, pixels 0…16 scaled to [−1, 1]; a stratified split
  of ``held_out`` images is never trained on): a small `UNet2DModel` (sample_size 8, 1 channel,
  block_out_channels (16, 32), one layer per block, DownBlock2D/UpBlock2D, the default mid block with attention,
  norm_num_groups 8; 164 k parameters, 65-75 ms per training step of 128 on one thread; in a pilot, (32, 64) trained
  for 600 steps (105 s) reached FD 52 at 32 steps where (16, 32) trained for 2500 steps (159 s) reached 21).
  Distances, with samples clamped to [−1, 1] as a pipeline's output would be:

  - **FD** (FID-like): the Fréchet distance between Gaussian fits of a digit classifier's 64 penultimate features
    (before its ReLU) of the generated images and of the training images. The classifier, a small CNN (conv 32 →
    conv 64 → 2×2 max-pool → linear 64 → ReLU → linear 10), is trained here on the training split (its held-out
    accuracy is recorded);
  - **MMD**: squared maximum mean discrepancy in pixel space (`mmd_rbf`, Gaussian kernels with bandwidths 0.5, 1 and 2
    × the median pairwise distance of the training images, fixed so that every method is scored by the same kernel)
    between the generated images and the training images.

  As many images are generated as are held out, so the generated rows and the real-vs-real floor share the
  estimator's sample-size bias.

Models (each data set; the same initial weights, seed ``seed``, for 1-RF and the ε-model):

* **1-RF**: `train_rectified_flow` on the data (σ ~ U[0, 1], x_σ = σ·noise + (1 − σ)·data, target noise − data).
* **2-RF**: `generate_reflow_pairs` from 1-RF (Heun, ``pair_steps`` steps, 2·steps − 1 model calls per pair),
  then `train_reflow` starting from a deep copy of 1-RF.
* **2-RF + distill**: `generate_reflow_pairs` from 2-RF (Heun, ``distill_pair_steps`` steps), then `distill(...,
  num_steps=1)` from a deep copy of 2-RF (L2 loss at σ = 1 only; the paper's best one-step numbers use LPIPS).
* **DDIM (ε)**: an ε-prediction model, the same network, initial weights, optimizer, batch size and number of steps
  as 1-RF (the same budget), trained on x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε with t uniform over the training timesteps
  (its loop mirrors `hf_ext.diffusion`'s: AdamW, linear warm-up, clipping at max_grad_norm, a generator per step).
  Sampled with `hf_ext.schedulers.UDMScheduler` η = 0 (linear β from 1e-4 to 0.02, ``clip_sample=False``,
  "trailing" spacing so that every grid starts at pure noise — "leading" puts the one-step grid at t = 0 — and
  1024 training timesteps, so that T/N is an integer for every N of the grid and DDIM's step rule t → t − T//N lands
  on the next listed timestep exactly as UDM's does). The same samples are drawn with diffusers' `DDIMScheduler`
  configured alike: ``checks.<data set>.ddim_vs_udm`` records, for every N, that the timesteps agree, that
  ``UDMScheduler.from_config(ddim.config, use_clipped_model_output=False)`` gives *bit-identical* samples, and the
  largest difference between DDIM and the UDM sampler as configured for the table (its default
  ``use_clipped_model_output=True``, the same update in a different float order).

Sampling: the same Gaussian noise for every method; flows by Euler steps on σ = 1, (N−1)/N, …, 1/N, 0
(`solve_flow`), the ε-model by N DDIM/UDM steps. **Every entry costs N model evaluations (NFE) per sample**
(recorded per entry); the training-side cost (pairs: ``pairs`` × (2·pair_steps − 1) model calls, training steps,
seconds) is recorded per model under ``tables.<data set>.training``.

Straightness, at the largest N of the grid (32):

* **S** (flows only): `hf_ext.diffusion.straightness`, Liu et al.'s ∫ E‖(x_noise − x_data) − v(x_σ, σ)‖² dσ along
  the model's own Euler paths, per dimension; 0 = straight lines at constant speed (one Euler step is exact).
* **path/chord**: the mean over samples of the path length Σ‖x_{i+1} − x_i‖ of the sampler's trajectory divided by
  the distance between its ends; 1 = straight. Independent of the time parametrisation, so it applies to DDIM as
  well (its ideal path, x_t = √ᾱ·x0 + √(1 − ᾱ)·ε, is a quarter circle in the (x0, ε) plane, not a line).

Reference floors (what a perfect sampler would score with these sample sizes): 8 Gaussians: the SW distance between
the reference set and ``floor_draws`` independent sets of the true distribution of the same size; digits: FD and MMD
of the held-out images against the training images (real vs real).

**Goal** (the paper's qualitative result), per data set with its headline distance (SW, FD): with D(method, N) the
distance after N steps and R = ``reference_steps`` (16), each of

    D(2-RF, 1) ≤ 1.5 · D(1-RF, R),   D(2-RF, 2) ≤ 1.5 · D(1-RF, R),   D(2-RF + distill, 1) ≤ 1.5 · D(1-RF, R)

is one metric with ``passed``; the ratio reported is D(1-RF, R) / D(candidate) (> 1: the candidate is closer to the
data; the goal is ratio ≥ 1/1.5). Informational metrics (no goal): 1-RF at 1 step and DDIM at 1 and R steps against
the same reference, 2-RF at 1 step against DDIM at 1 step, and S of 2-RF against 1-RF. Distances close to the floor
are dominated by sampling noise; the floors are in the tables.

Results: ``benchmarks/results/reflow_quality.json`` (``tables``: every distance per method and N, NFE, straightness,
training curves and times, pair generation, floors, the classifier), markdown tables in RESULTS.md and
``benchmarks/results/reflow_quality.png`` (distance vs steps, 2-D samples per method at 1/2/32 steps, 1-RF vs 2-RF
trajectories, digit samples per method at 1 and 32 steps).

Run with ``hf-ext bench reflow_quality`` (16 minutes on 2 shared CPU cores with one torch thread: 8 Gaussians 3.7,
digits 12; the digit models train at 65-75 ms per step;
``HF_EXT_BENCH_THREADS=N`` changes the thread count) or ``hf-ext bench reflow_quality --quick`` (tiny models for a few
steps: a smoke test of every code path in seconds, not a measurement; written to ``benchmarks/results/quick/``).
"""

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hf_ext.benchmarking import (
    THREADS_ENVIRONMENT_VARIABLE,
    benchmark_settings,
    configure_threads,
    make_result,
    pyplot,
    save_figure,
    save_result,
)
from hf_ext.diffusion import (FlowTrainingArguments, VelocityMLP, distill, eight_gaussians, generate_reflow_pairs,
                              mmd_rbf, predict_velocity, sliced_wasserstein, solve_flow, straightness, train_reflow,
                              train_rectified_flow)
from hf_ext.schedulers import UDMScheduler

NAME = "reflow_quality"
BENCH_DIR = Path(__file__).resolve().parent
CANDIDATE = "hf_ext.diffusion 2-rectified flow (train_reflow; + distill to one step where named)"
PEER = "1-rectified flow (train_rectified_flow), or the row named in the metric"
METHODS = {"rf1": "1-RF", "rf2": "2-RF", "rf2_distill": "2-RF + distill", "ddim": "DDIM (ε, UDM η=0)"}
FLOW_METHODS = ("rf1", "rf2", "rf2_distill")
TASK_LABELS = {"toy": "8 Gaussians", "digits": "digits"}

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


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Distances


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(C_a + C_b − 2(C_a C_b)^½) between Gaussian fits of two feature sets (rows are samples).

    tr (C_a C_b)^½ is computed as the sum of √eigenvalues of the symmetric C_a^½ C_b C_a^½ (the same eigenvalues),
    which stays real and finite for singular covariances, unlike a general matrix square root.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def path_length_ratio(states: list[torch.Tensor]) -> float:
    """Mean over samples of (length of the polyline through ``states``) / (distance between its ends); 1 = straight."""
    stacked = torch.stack([state.flatten(1).double() for state in states])  # [steps + 1, n, d]
    length = (stacked[1:] - stacked[:-1]).norm(dim=2).sum(0)
    chord = (stacked[-1] - stacked[0]).norm(dim=1).clamp(min=1e-12)
    return (length / chord).mean().item()


class DigitClassifier(torch.nn.Module):
    """conv → conv → 2×2 max-pool → linear (the features) → ReLU → linear (10 classes), for 1×8×8 images."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(2 * width * 16, features))
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(features, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: dict, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    classifier = DigitClassifier(config["width"], config["features"])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=config["learning_rate"])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), config["batch_size"]):
            index = order[start : start + config["batch_size"]]
            loss = torch.nn.functional.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


# ----------------------------------------------------------------------------------------------------------------
# Data sets


@dataclass
class Task:
    key: str  # "toy" or "digits"
    train_data: torch.Tensor
    sample_shape: tuple
    make_model: Callable[[], torch.nn.Module]
    distance: Callable[[torch.Tensor], dict]  # samples -> {"sw": …} or {"fd": …, "mmd": …}
    headline: str  # the key of the headline distance
    eval_samples: int
    floors: dict
    report: dict


def toy_task(config: dict, seed: int) -> Task:
    train = eight_gaussians(config["train_samples"], generator=torch.Generator().manual_seed(seed))
    reference = eight_gaussians(config["eval_samples"], generator=torch.Generator().manual_seed(seed + 1))
    draws = [eight_gaussians(config["eval_samples"], generator=torch.Generator().manual_seed(seed + 2 + i))
             for i in range(config["floor_draws"])]
    floor_values = [sliced_wasserstein(draw, reference) for draw in draws]

    def distance(samples: torch.Tensor) -> dict:
        return {"sw": sliced_wasserstein(samples, reference)}

    def make_model() -> torch.nn.Module:
        return VelocityMLP(sample_dim=2, **config["model"])

    return Task("toy", train, (2,), make_model, distance, "sw", config["eval_samples"],
                floors={"sw": sum(floor_values) / len(floor_values), "sw_draws": floor_values},
                report={"reference": reference})


def digits_task(config: dict, seed: int) -> Task:
    from diffusers import UNet2DModel
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    labels = torch.tensor(digits.target)
    train_index, held_index = train_test_split(np.arange(len(images)), test_size=config["held_out"],
                                               stratify=digits.target, random_state=seed)
    train_index, held_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(held_index))
    train, held = images[train_index], images[held_index]

    started = time.perf_counter()
    classifier = train_classifier(train, labels[train_index], config["classifier"], seed)
    with torch.no_grad():
        accuracy = (classifier(held).argmax(1) == labels[held_index]).float().mean().item()
    classifier_seconds = time.perf_counter() - started

    @torch.no_grad()
    def features(x: torch.Tensor) -> np.ndarray:
        return classifier.features(x.clamp(-1, 1)).double().numpy()

    train_features = features(train)
    flat = train.flatten(1).double()
    distances = torch.cdist(flat, flat)
    median = distances[distances > 0].median().item()
    bandwidths = (0.5 * median, median, 2 * median)

    def distance(samples: torch.Tensor) -> dict:
        samples = samples.clamp(-1, 1)
        return {"fd": frechet_distance(features(samples), train_features),
                "mmd": mmd_rbf(samples, train, bandwidths=bandwidths)}

    def make_model() -> torch.nn.Module:
        model_config = {key: tuple(value) if isinstance(value, list) else value
                        for key, value in config["model"].items()}
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **model_config)

    floors = distance(held)
    report = {
        "images": len(images), "train_images": len(train), "held_out_images": len(held),
        "pixel_scaling": "x / 16 * 2 - 1 (pixels 0…16 → [-1, 1])",
        "split": f"sklearn train_test_split(test_size={config['held_out']}, stratify=labels, random_state={seed})",
        "classifier": {"architecture": repr(classifier), "held_out_accuracy": accuracy, "seconds": classifier_seconds,
                       **config["classifier"]},
        "mmd_bandwidths": bandwidths,
        "train": train, "held": held,
    }
    return Task("digits", train, (1, 8, 8), make_model, distance, "fd", len(held), floors=floors, report=report)


# ----------------------------------------------------------------------------------------------------------------
# Training


def flow_arguments(config: dict, stage: str, seed: int) -> FlowTrainingArguments:
    stage_config = config[stage]
    return FlowTrainingArguments(max_steps=stage_config["max_steps"], batch_size=config["batch_size"],
                                 learning_rate=stage_config["learning_rate"], weight_decay=config["weight_decay"],
                                 warmup_steps=stage_config["warmup_steps"], max_grad_norm=config["max_grad_norm"],
                                 seed=seed, show_progress=False)


def train_epsilon_model(model, data: torch.Tensor, args: FlowTrainingArguments, scheduler: UDMScheduler):
    """ε-prediction training with the settings of a flow run: AdamW, linear warm-up, clipping, a generator per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.warmup_steps + 1)))
    timesteps = scheduler.config.num_train_timesteps
    model.train()
    losses = []
    for step in range(args.max_steps):
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + 7)
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(timesteps, (args.batch_size,), generator=generator)
        prediction = predict_velocity(model, scheduler.add_noise(x0, noise, t), t)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def _training_record(kind: str, args: FlowTrainingArguments, losses: list[float], seconds: float) -> dict:
    window = max(1, len(losses) // 20)
    curve = {str(start + window): sum(losses[start : start + window]) / len(losses[start : start + window])
             for start in range(0, len(losses), window)}
    head = losses[: max(1, len(losses) // 20)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"objective": kind, "steps": args.max_steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "seconds": seconds,
            "seconds_per_step": seconds / args.max_steps, "loss_first_5pct": sum(head) / len(head),
            "loss_last_10pct": sum(tail) / len(tail), "loss_curve": curve,
            "finite": all(math.isfinite(loss) for loss in losses)}


def _pairs(model, config: dict, task: Task, steps: int, seed: int) -> tuple:
    started = time.perf_counter()
    pairs = generate_reflow_pairs(model, config["pairs"], task.sample_shape, num_inference_steps=steps, solver="heun",
                                  seed=seed, show_progress=False)
    seconds = time.perf_counter() - started
    return pairs, {"pairs": config["pairs"], "solver": "heun", "steps": steps, "nfe_per_pair": 2 * steps - 1,
                   "seconds": seconds, "seed": seed}


def train_models(task: Task, config: dict, settings: dict, udm: UDMScheduler) -> tuple[dict, dict]:
    """1-RF, the ε-model (same initial weights and budget), 2-RF from 1-RF's pairs and its one-step distillation."""
    seed = settings["seed"]
    torch.manual_seed(seed)
    initial = task.make_model()
    parameters = sum(p.numel() for p in initial.parameters())
    models, training = {}, {"parameters": parameters}

    started = time.perf_counter()
    args = flow_arguments(config, "rf", seed)
    result = train_rectified_flow(copy.deepcopy(initial), task.train_data, args)
    models["rf1"] = result.model.eval()
    training["rf1"] = _training_record("1-rectified flow (train_rectified_flow)", args, result.losses,
                                       time.perf_counter() - started)
    _log(f"  1-RF: {args.max_steps} steps in {training['rf1']['seconds']:.0f} s, loss "
         f"{training['rf1']['loss_first_5pct']:.4f} → {training['rf1']['loss_last_10pct']:.4f}")

    started = time.perf_counter()
    model, losses = train_epsilon_model(copy.deepcopy(initial), task.train_data, args, udm)
    models["ddim"] = model.eval()
    training["ddim"] = _training_record("ε-prediction (MSE to the noise)", args, losses, time.perf_counter() - started)
    _log(f"  ε-model: {args.max_steps} steps in {training['ddim']['seconds']:.0f} s, loss "
         f"{training['ddim']['loss_first_5pct']:.4f} → {training['ddim']['loss_last_10pct']:.4f}")

    pairs, training["rf2_pairs"] = _pairs(models["rf1"], config, task, config["pair_steps"], seed + 100)
    _log(f"  1-RF pairs: {config['pairs']} × {training['rf2_pairs']['nfe_per_pair']} NFE in "
         f"{training['rf2_pairs']['seconds']:.0f} s")
    started = time.perf_counter()
    args = flow_arguments(config, "reflow", seed + 1)
    result = train_reflow(copy.deepcopy(models["rf1"]), pairs, args)
    models["rf2"] = result.model.eval()
    training["rf2"] = _training_record("reflow (train_reflow) from 1-RF, on 1-RF's pairs", args, result.losses,
                                       time.perf_counter() - started)
    _log(f"  2-RF: {args.max_steps} steps in {training['rf2']['seconds']:.0f} s, loss "
         f"{training['rf2']['loss_first_5pct']:.4f} → {training['rf2']['loss_last_10pct']:.4f}")

    pairs, training["rf2_distill_pairs"] = _pairs(models["rf2"], config, task, config["distill_pair_steps"],
                                                  seed + 200)
    _log(f"  2-RF pairs: {config['pairs']} × {training['rf2_distill_pairs']['nfe_per_pair']} NFE in "
         f"{training['rf2_distill_pairs']['seconds']:.0f} s")
    started = time.perf_counter()
    args = flow_arguments(config, "distill", seed + 2)
    result = distill(copy.deepcopy(models["rf2"]), pairs, args, num_steps=1)
    models["rf2_distill"] = result.model.eval()
    training["rf2_distill"] = _training_record("1-step distillation (distill) from 2-RF, on 2-RF's pairs", args,
                                               result.losses, time.perf_counter() - started)
    _log(f"  distill: {args.max_steps} steps in {training['rf2_distill']['seconds']:.0f} s, loss "
         f"{training['rf2_distill']['loss_first_5pct']:.4f} → {training['rf2_distill']['loss_last_10pct']:.4f}")
    return models, training


# ----------------------------------------------------------------------------------------------------------------
# Sampling and evaluation


def make_schedulers(config: dict):
    """(UDMScheduler η = 0, diffusers DDIMScheduler) on the same schedule, both without clipping."""
    from diffusers import DDIMScheduler

    common = dict(config, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    return UDMScheduler(**common, eta=0.0), DDIMScheduler(**common)


@torch.no_grad()
def sample_epsilon_model(model, scheduler, noise: torch.Tensor, num_steps: int, trajectory: bool = False):
    """The pipeline loop: set_timesteps(N), then model output → scheduler.step for each timestep (η = 0)."""
    scheduler.set_timesteps(num_steps)
    sample, states = noise, [noise]
    for t in scheduler.timesteps:
        output = predict_velocity(model, sample, t.expand(sample.shape[0]))
        sample = scheduler.step(output, t, sample).prev_sample
        if trajectory:
            states.append(sample)
    return sample, (states if trajectory else None)


def draw(method: str, models: dict, udm, noise: torch.Tensor, num_steps: int, trajectory: bool = False):
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
        _log(f"  {METHODS[method]:<20} " + "  ".join(
            f"{n}: {record['distance'][n][task.headline]:.4g}" for n in settings["steps"])
             + f"  | S {record['straightness'] if record['straightness'] is None else round(record['straightness'], 5)}"
             + f", path/chord {record['path_length_ratio']:.4f} ({record['seconds']:.0f} s)")
    return results


def ddim_check(model, config: dict, noise: torch.Tensor, steps) -> dict:
    """UDM (η = 0) against diffusers' DDIMScheduler on the same ε-model and noise, for every N of the grid."""
    udm, ddim = make_schedulers(config)
    udm_ddim_form = UDMScheduler.from_config(ddim.config, use_clipped_model_output=False, eta=0.0)
    per_steps = {}
    for num_steps in steps:
        reference, _ = sample_epsilon_model(model, ddim, noise, num_steps)
        ours, _ = sample_epsilon_model(model, udm, noise, num_steps)
        same_form, _ = sample_epsilon_model(model, udm_ddim_form, noise, num_steps)
        udm.set_timesteps(num_steps)
        ddim.set_timesteps(num_steps)
        scale = max(1.0, reference.abs().max().item())
        per_steps[num_steps] = {
            "timesteps": ddim.timesteps.tolist(),
            "timesteps_equal": bool(torch.equal(udm.timesteps, ddim.timesteps)),
            "bit_identical_udm_from_ddim_config": bool(torch.equal(same_form, reference)),
            "udm_default_max_abs_diff": (ours - reference).abs().max().item(),
            "udm_default_max_relative_diff": (ours - reference).abs().max().item() / scale,
        }
    return {
        "samples": len(noise),
        "alphas_cumprod_equal": bool(torch.equal(udm.alphas_cumprod, ddim.alphas_cumprod)),
        "per_steps": per_steps,
        "identical": all(r["timesteps_equal"] and r["bit_identical_udm_from_ddim_config"] for r in per_steps.values()),
        "udm_default_within_1e-4": all(r["udm_default_max_relative_diff"] <= 1e-4 for r in per_steps.values()),
        "definition": "identical: for every N the timesteps agree and UDMScheduler.from_config(ddim.config, "
                      "use_clipped_model_output=False) gives bit-identical samples to DDIMScheduler; "
                      "udm_default_*: the table's UDM sampler (use_clipped_model_output=True), "
                      "max |Δ| / max(1, max|x|)",
    }


# ----------------------------------------------------------------------------------------------------------------
# Reporting


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
    metrics[f"{label}: straightness S, 2-RF vs 1-RF"] = {
        "description": f"Liu et al.'s straightness S (hf_ext.diffusion.straightness, {max(settings['steps'])} Euler "
                       "steps, per dimension); 0 = straight paths",
        "unit": "S", "candidate": s2, "peer": s1, "speed_ratio": s1 / s2 if s2 > 0 else math.inf,
        "ratio_definition": "1-RF S / 2-RF S; > 1 means 2-RF is straighter",
        "goal": None, "min_speed_ratio": None, "passed": None,
    }
    return metrics


def markdown_tables(task: Task, evaluation: dict, training: dict, checks: dict, settings: dict) -> list[str]:
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


def plot(path: Path, evaluations: dict, tasks: dict, settings: dict) -> Path | None:
    """Distance vs steps, 2-D samples and trajectories, digit sample grids: one figure."""
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
                axes[row][column].imshow(_grid(images), cmap="gray_r", vmin=-1, vmax=1)
                fd = evaluations["digits"][method]["distance"][num_steps]["fd"]
                axes[row][column].set_title(f"{METHODS[method]}, {num_steps} step{'s' if num_steps > 1 else ''}: "
                                            f"FD {fd:.3g}", fontsize=9)
                axes[row][column].axis("off")
            axis = axes[row][len(methods)]
            if num_steps == digit_steps[0]:
                axis.imshow(_grid(real[:count]), cmap="gray_r", vmin=-1, vmax=1)
                axis.set_title(f"digits: held-out real (floor FD {tasks['digits'].floors['fd']:.3g})", fontsize=9)
            axis.axis("off")
            row += 1
    figure.suptitle("Rectified flow vs reflow vs DDIM: quality against sampling steps (same noise for every method)")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.5 * sum(heights))))
    return save_figure(figure, path, dpi=80)


def _grid(images: torch.Tensor, columns: int = 10) -> np.ndarray:
    """[n, 1, 8, 8] images in [-1, 1] → one array, ``columns`` wide, 1-pixel gaps."""
    images = images.clamp(-1, 1)[:, 0].numpy()
    rows = math.ceil(len(images) / columns)
    canvas = np.full((rows * 9 + 1, columns * 9 + 1), -1.0)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        canvas[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = image
    return canvas


def _jsonable_evaluation(evaluation: dict) -> dict:
    return {method: {"label": r["label"], "finite": r["finite"], "seconds": r["seconds"],
                     "straightness": r["straightness"], "path_length_ratio": r["path_length_ratio"],
                     "nfe": {str(n): v for n, v in r["nfe"].items()},
                     "distance": {str(n): v for n, v in r["distance"].items()}}
            for method, r in evaluation.items()}


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def run(settings: dict, *, quick: bool = False, benchmarks_dir: Path = BENCH_DIR, save: bool = True) -> dict:
    """Both data sets (``settings["tasks"]``): train, sample, score; the result document, saved when ``save``."""
    started = time.perf_counter()
    if os.environ.get(THREADS_ENVIRONMENT_VARIABLE) is None:
        # One thread unless asked otherwise: on the shared 2-core machine a UNet step took 0.25 s with one thread and
        # 0.53 s with two while another process was busy. The numbers here are distances, not speeds.
        torch.set_num_threads(1)
    threads = configure_threads()
    settings = {**copy.deepcopy(settings), "threads": threads, "device": "cpu", "dtype": "float32"}
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
        _log(f"{TASK_LABELS[key]}:")
        task = toy_task(config, settings["seed"]) if key == "toy" else digits_task(config, settings["seed"])
        tasks[key] = task
        _log(f"  floors: { {k: v for k, v in task.floors.items() if not isinstance(v, list)} }"
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
        _log(f"  DDIM vs UDM: identical {checks[key]['ddim_vs_udm']['identical']}, UDM default within 1e-4: "
             f"{checks[key]['ddim_vs_udm']['udm_default_within_1e-4']}")
        metrics.update(task_metrics(task, evaluation, settings))
        tables += markdown_tables(task, evaluation, training, checks[key], settings)
        report = {k: v for k, v in task.report.items() if not isinstance(v, torch.Tensor)}
        task_tables[key] = {"headline_distance": task.headline, "floors": task.floors, "data": report,
                            "eval_samples": task.eval_samples, "training": training,
                            "methods": _jsonable_evaluation(evaluation)}
        sections[key] = time.perf_counter() - section_start
        _log(f"  {TASK_LABELS[key]} done in {sections[key]:.0f} s")

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
    result["plots"] = []
    result["plot_file"] = None
    if save:
        results_dir = Path(benchmarks_dir) / "results" / ("quick" if quick else "")
        picture = plot(results_dir / f"{NAME}.png", evaluations, tasks, settings)
        result["plots"] = [str(picture.relative_to(benchmarks_dir))] if picture and not quick else []
        result["plot_file"] = str(picture) if picture else None
    sections["total"] = time.perf_counter() - started
    result["sections_seconds"] = sections
    result["total_seconds"] = sections["total"]
    for table in tables:
        _log("\n" + table)
    if save:
        path = save_result(result, benchmarks_dir)
        _log(f"\nresults in {path} ({result['total_seconds']:.0f} s in all)")
    return result


def main(quick: bool = False, **overrides) -> dict:
    """Run the benchmark; keyword arguments override entries of `FULL` / `QUICK` (e.g. ``tasks=("toy",)``)."""
    return run(benchmark_settings(FULL, QUICK, quick, overrides), quick=quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
