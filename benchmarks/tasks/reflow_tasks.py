"""The two data sets of ``reflow_quality``: 8 Gaussians (2-D points, scored by the sliced 2-Wasserstein distance) and
the 8×8 digits (images, scored by a classifier-feature Fréchet distance and pixel-space MMD), each with its model
factory and the floor a perfect sampler would score with the same sample sizes."""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .digit_images import digit_split, train_classifier
from .distances import frechet_distance, mmd_rbf, sliced_wasserstein
from .toy2d import VelocityMLP, eight_gaussians

METHODS = {"rf1": "1-RF", "rf2": "2-RF", "rf2_distill": "2-RF + distill", "ddim": "DDIM (ε, UDM η=0)"}
FLOW_METHODS = ("rf1", "rf2", "rf2_distill")
TASK_LABELS = {"toy": "8 Gaussians", "digits": "digits"}


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
    """8 Gaussians: training points, a reference set and ``floor_draws`` fresh sets for the SW floor."""
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
    """Digits: the split, the feature classifier trained on the training split, FD and MMD against the training
    images (samples clamped to [−1, 1]); the floors score the held-out images."""
    from diffusers import UNet2DModel

    split = digit_split(config["held_out"], seed)
    train, held = split["train"], split["held"]

    started = time.perf_counter()
    classifier = train_classifier(train, split["train_labels"], config["classifier"], seed)
    with torch.no_grad():
        accuracy = (classifier(held).argmax(1) == split["held_labels"]).float().mean().item()
    classifier_seconds = time.perf_counter() - started

    @torch.no_grad()
    def features(x: torch.Tensor):
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
        "images": split["images"], "train_images": len(train), "held_out_images": len(held),
        "pixel_scaling": "x / 16 * 2 - 1 (pixels 0…16 → [-1, 1])",
        "split": f"sklearn train_test_split(test_size={config['held_out']}, stratify=labels, random_state={seed})",
        "classifier": {"architecture": repr(classifier), "held_out_accuracy": accuracy, "seconds": classifier_seconds,
                       **config["classifier"]},
        "mmd_bandwidths": bandwidths,
        "train": train, "held": held,
    }
    return Task("digits", train, (1, 8, 8), make_model, distance, "fd", len(held), floors=floors, report=report)
