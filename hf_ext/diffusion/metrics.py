"""Distances between two sample sets (rows are samples): how close generated samples are to the data."""

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
