"""The unified diffusion model (UDM, kexue.fm posts 9262/9271) for Gaussian noise: schedules and the reverse step.

Notation (Su's): the forward process is ``x_t = a_t·x0 + b_t·ε`` (VP schedules: a_t = √ᾱ_t, b_t = √(1 − ᾱ_t) in
diffusers' ``alphas_cumprod`` terms; rectified flow: a = 1 − σ, b = σ). One reverse step from t to an earlier s is
"predict, then correct":

    x̂0 = the model's estimate of x0 (from whatever it predicts);  ε̂ = (x_t − a_t·x̂0) / b_t
    x_s = a_s·x̂0 + √(b_s² − σ²)·ε̂ + σ·z,      z ~ N(0, I)

Every valid σ ∈ [0, b_s] gives a sampler with the right marginals. σ = 0 is DDIM (the discretised probability-flow
ODE); σ = the DDPM posterior std `posterior_std` is DDPM; η·posterior_std is η-DDIM. DDPM's "fixed_large" variance
keeps the posterior mean but draws noise of the one-step variance b_{t|s}²: in UDM terms that is a non-zero x0-posterior
std σ̄ (x̂0 ~ N(G, σ̄²)), whose noise passes through the x̂0 coefficient of the step — the two Gaussians add up to a
single draw of std b_{t|s}. No transformers/diffusers imports here.
"""

import math

import torch

VP_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine", "sigmoid")
SCHEDULES = (*VP_BETA_SCHEDULES, "rectified_flow")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


def vp_betas(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float, trained_betas=None,
             rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """β_t for t = 0 … T−1 (float32), computed with the same float32 operations as diffusers' DDPM/DDIM schedulers,
    so the arrays are bit-identical and sampler parity is not blurred by schedule rounding."""
    T = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # latent diffusion's schedule: linear in √β
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule in ("squaredcos_cap_v2", "cosine"):  # Nichol & Dhariwal's cosine ᾱ, betas capped at 0.999

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    elif beta_schedule == "sigmoid":  # GeoDiff
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not a VP schedule; choose one of {VP_BETA_SCHEDULES}")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last timestep has zero signal (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1): √ᾱ_t is shifted so that its last value is 0, then scaled so that its first value is
    unchanged. ᾱ_{T−1} = 0 means an ε-prediction model cannot recover x0 at the top; the paper pairs it with
    v_prediction and "trailing" spacing."""
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod -= last
    sqrt_alphas_cumprod *= first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[0:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def interpolate_log_alphas_cumprod(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at real t ∈ [0, T−1]: linear interpolation of log ᾱ between the integer timesteps (exact at integers)."""
    log_alphas = alphas_cumprod.double().log()
    low = t.floor().clamp(0, len(alphas_cumprod) - 1).long()
    high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
    weight = t.double() - low.double()
    return torch.exp(log_alphas[low] * (1 - weight) + log_alphas[high] * weight)


def split_prediction(model_output: torch.Tensor, sample: torch.Tensor, a_t, b_t, prediction_type: str,
                     variance_preserving: bool = True):
    """(x̂0, ε̂) from the model output, for x_t = a·x0 + b·ε.

    epsilon: ε;  sample: x0;  v_prediction: v = a·ε − b·x0;  flow_prediction: v = ε − x0 (rectified flow's velocity,
    defined for any schedule). For variance-preserving schedules (a² + b² = 1) the v formulas are diffusers' own.
    """
    if prediction_type == "epsilon":
        x0 = (sample - b_t * model_output) / a_t
        return x0, model_output
    if prediction_type == "sample":
        return model_output, (sample - a_t * model_output) / b_t
    if prediction_type == "v_prediction":
        if variance_preserving:
            return a_t * sample - b_t * model_output, a_t * model_output + b_t * sample
        norm = a_t * a_t + b_t * b_t
        return (a_t * sample - b_t * model_output) / norm, (a_t * model_output + b_t * sample) / norm
    if prediction_type == "flow_prediction":
        return (sample - b_t * model_output) / (a_t + b_t), (sample + a_t * model_output) / (a_t + b_t)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


def one_step_variance(alpha_prod_t, beta_prod_t, alpha_prod_s, beta_prod_s, variance_preserving: bool = True):
    """b_{t|s}²: the variance of x_t given x_s (s < t), where x_t = (a_t/a_s)·x_s + b_{t|s}·ε.

    Arguments are the squares a², b². Variance-preserving schedules (a² + b² = 1) give 1 − ᾱ_t/ᾱ_s, DDPM's β_t,
    computed in that form (DDPM's own float32 operations); other schedules use b_t² − (a_t²/a_s²)·b_s².
    """
    ratio = alpha_prod_t / alpha_prod_s
    return 1 - ratio if variance_preserving else beta_prod_t - ratio * beta_prod_s


def posterior_variance(one_step_var, beta_prod_t, beta_prod_s):
    """Variance of q(x_s | x_t, x0) = b_s²·b_{t|s}²/b_t². With σ² equal to it the UDM step is the DDPM posterior."""
    return beta_prod_s / beta_prod_t * one_step_var


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen): per sample, s = the ``ratio`` quantile of |x̂0| clamped to [1, max_value];
    x̂0 is clipped to [−s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1).float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)
