"""Rectified-flow arithmetic: noise levels (sigmas), their shifts, and the solver steps.

Convention (diffusers' flow matching, used everywhere in hf_ext): ``x_σ = σ·noise + (1 − σ)·data`` with σ = 1 pure
noise and σ = 0 data; the model predicts the velocity ``v = noise − data`` = dx_σ/dσ, and sampling integrates
dx/dσ = v from σ = 1 down to σ = 0. The paper's time is t = 1 − σ (its velocity is −v).

No transformers/diffusers imports here: these are the functions the scheduler and the reflow trainer share.
"""

import math

import numpy as np
import torch


def shift_sigmas(sigmas, shift: float):
    """Static shift (SD3): σ' = s·σ / (1 + (s − 1)·σ). s > 1 spends more steps at high noise; s = 1 is the identity."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas, mu: float, kind: str = "exponential", exponent: float = 1.0):
    """Resolution-dependent shift (Flux): exp(μ)/(exp(μ) + (1/σ − 1)^e), or μ/(μ + (1/σ − 1)^e) for ``linear``.

    With e = 1 the exponential form equals `shift_sigmas` with s = exp(μ).
    """
    strength = math.exp(mu) if kind == "exponential" else mu
    return strength / (strength + (1 / sigmas - 1) ** exponent)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """μ for `time_shift`, linear in the number of latent tokens: base_shift at base_seq_len, max_shift at max_seq_len."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def stretch_to_terminal(sigmas, terminal: float):
    """Stretch a decreasing σ grid so that its last value is ``terminal`` (1 − σ is scaled, σ_max stays)."""
    one_minus = 1 - sigmas
    return 1 - one_minus * (1 - terminal) / one_minus[-1]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, num_steps)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """σ evenly spaced in log σ from σ_max to σ_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """σ at the quantiles of a Beta(α, β) distribution (Lee et al. 2024, "Beta sampling is all you need")."""
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_steps), alpha, beta)
    return sigma_min + quantiles * (sigma_max - sigma_min)


def add_flow_noise(data: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The forward process x_σ = σ·noise + (1 − σ)·data; ``sigma`` is a float or a per-sample tensor [batch]."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        sigma = sigma.reshape(-1, *([1] * (data.ndim - 1)))
    return sigma * noise + (1.0 - sigma) * data


def flow_velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target of rectified flow in this convention: dx_σ/dσ = noise − data."""
    return noise - data


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dσ = v: x + (σ_next − σ)·v."""
    return sample + (sigma_next - sigma) * velocity


def heun_step(sample: torch.Tensor, velocity: torch.Tensor, velocity_at_predictor: torch.Tensor, sigma, sigma_next):
    """Heun's correction: x + (σ_next − σ)·(v(x, σ) + v(x̃, σ_next))/2, with x̃ the Euler predictor."""
    return sample + (sigma_next - sigma) * 0.5 * (velocity + velocity_at_predictor)
