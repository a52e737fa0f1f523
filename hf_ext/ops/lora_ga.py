"""LoRA-GA initial factors from the singular vectors of a weight gradient (Wang et al. 2024, arXiv 2407.05000).

PyTorch convention: W0 [m, n] (m = out, n = in), adapter ΔW = s·B A with B [m, r] and A [r, n]. With the gradient
G = U Σ Vᵀ, one SGD step of (A, B) from orthonormal factors moves W by -η s² (B Bᵀ G + G Aᵀ A); giving the top 2r
singular directions to the two projections (r each) makes that the best rank-2r approximation of -η s² G. The
factors are orthonormal singular vectors (no singular values) scaled by m^¼ / √γ on *both* sides — the paper's and
its reference code's "stable" scale (PEFT 0.21's built-in multiplies B by the singular values and scales B only).
"""

from __future__ import annotations

import torch

from .._validation import check_number

LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
LORA_GA_SCALES = ("stable", "gd", "unit")


def check_lora_ga_options(direction: str, scale: str, stable_gamma: float) -> None:
    """ValueError naming the option when direction, scale or stable_gamma is not allowed."""
    if direction not in LORA_GA_DIRECTIONS:
        raise ValueError(f"direction must be one of {LORA_GA_DIRECTIONS}, got {direction!r}")
    if scale not in LORA_GA_SCALES:
        raise ValueError(f"scale must be one of {LORA_GA_SCALES}, got {scale!r}")
    check_number("stable_gamma", stable_gamma, low=0, low_open=True)


def lora_ga_factors(
    left_vectors: torch.Tensor,
    right_vectors: torch.Tensor,
    rank: int,
    *,
    scaling: float,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, n], B [m, r]) from the gradient's left singular vectors U [m, ≥2r] and right ones V [n, ≥2r].

    direction: ``"ArB2r"`` (A = V[:, :r]ᵀ, B = U[:, r:2r]; the paper's default), ``"A2rBr"`` (A = V[:, r:2r]ᵀ,
    B = U[:, :r]) or ``"ArBr"`` (A from the odd, B from the even indices of the first 2r). scale: ``"stable"``
    (both factors × m^¼/√stable_gamma), ``"gd"`` (both ÷ scaling, so the first step mimics gradient descent) or
    ``"unit"`` (orthonormal as they are). ``scaling`` is the adapter's s (α/r, or α/√r with rsLoRA).
    """
    check_lora_ga_options(direction, scale, stable_gamma)
    available = min(left_vectors.shape[1], right_vectors.shape[1])
    if not 1 <= rank or 2 * rank > available:
        raise ValueError(f"rank must be in [1, {available // 2}] (2·rank singular vectors are needed), got {rank}")
    if direction == "ArB2r":
        a_index, b_index = slice(0, rank), slice(rank, 2 * rank)
    elif direction == "A2rBr":
        a_index, b_index = slice(rank, 2 * rank), slice(0, rank)
    else:
        a_index, b_index = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    lora_a = right_vectors[:, a_index].T.clone()
    lora_b = left_vectors[:, b_index].clone()
    if scale == "stable":
        factor = left_vectors.shape[0] ** 0.25 / stable_gamma ** 0.5
    elif scale == "gd":
        factor = 1.0 / scaling
    else:
        factor = 1.0
    return lora_a * factor, lora_b * factor
