"""Distances between two sample sets (rows are samples): how close generated samples are to the data; and how
straight a sampler's trajectories are."""

import numpy as np
import torch


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: the root mean over random directions of W2² between the 1-D projections.

    Both sets are flattened to [n, d] and must hold the same number of samples (sorted projections are matched).
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same number of samples and dimensions, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    directions = torch.randn(x.shape[1], num_projections, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    x_proj, y_proj = (x @ directions).sort(dim=0).values, (y @ directions).sort(dim=0).values
    return ((x_proj - y_proj) ** 2).mean().sqrt().item()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None) -> float:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate, ≥ 0).

    Default bandwidths: the median pairwise distance of the pooled samples times 0.5, 1 and 2.
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    pooled = torch.cat([x, y])
    distances = torch.cdist(pooled, pooled) ** 2
    if bandwidths is None:
        median = distances[distances > 0].median().sqrt().item()
        bandwidths = (0.5 * median, median, 2 * median)
    kernel = sum(torch.exp(-distances / (2 * h * h)) for h in bandwidths)
    n = len(x)
    return (kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()).item()


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
