"""The distances and the straightness measure the benchmarks score samples with (benchmarks/tasks/distances.py)."""

import math

import numpy as np
import pytest
import torch

from benchmarks.tasks.distances import frechet_distance, path_length_ratio


def test_frechet_distance():
    generator = np.random.default_rng(0)
    a = generator.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(m, 4I) in d = 3: |m|² + tr(I + 4I − 2·2I) = |m|² + 3
    shifted = 2 * generator.normal(size=(200_000, 3)) + np.array([1.0, 0.0, 2.0])
    reference = generator.normal(size=(200_000, 3))
    assert frechet_distance(reference, shifted) == pytest.approx(5.0 + 3.0, rel=0.02)
    # a singular covariance (a constant feature) stays finite
    constant = np.concatenate([a[:, :2], np.zeros((len(a), 1))], axis=1)
    assert math.isfinite(frechet_distance(constant, a))


def test_path_length_ratio():
    start, end = torch.zeros(5, 2), torch.ones(5, 2)
    straight = [start + f * (end - start) for f in (0.0, 0.25, 0.5, 1.0)]
    assert path_length_ratio(straight) == pytest.approx(1.0)
    corner = [start, torch.tensor([[1.0, 0.0]]).expand(5, 2), end]
    assert path_length_ratio(corner) == pytest.approx(2 / math.sqrt(2))
