"""UDMScheduler: DDPM, DDIM (any η) and the probability-flow ODE as one sampler of the unified diffusion model.

For ``x_t = a_t·x0 + b_t·ε`` (see `hf_ext.ops.udm`), each step from t to the next timestep s of the schedule is

    x̂0 = estimate from the model output (epsilon / sample / v_prediction / flow_prediction), clipped if configured
    ε̂  = (x_t − a_t·x̂0)/b_t                        (or the model's own ε with use_clipped_model_output=False)
    σ   = η · b_s·b_{t|s}/b_t                        (η = 0: DDIM / probability-flow ODE; η = 1: DDPM)
    x_s = a_s·x̂0 + √(b_s² − σ²)·ε̂ + σ_noise·z       (σ_noise = σ, or b_{t|s} for variance_type="fixed_large")

Settings that reproduce diffusers' schedulers (same generator ⇒ same samples; `tests/test_udm_scheduler.py`):

* ``DDPMScheduler``: ``UDMScheduler.from_config(ddpm.config, eta=1.0)`` (``variance_type`` fixed_small or fixed_large);
* ``DDIMScheduler``: ``UDMScheduler.from_config(ddim.config, use_clipped_model_output=False)`` and the pipeline's
  ``eta`` (step's ``eta`` overrides the config, as in DDIM). DDIM estimates noise from the *unclipped* model output
  by default; UDM's "predict then correct" uses the clipped x̂0, which is what DDPM does. With ``clip_sample=False``
  the two coincide.
* Probability-flow ODE: η = 0. The step is then Euler's method for the ODE written in y = x/a and τ = b/a
  (dy/dτ = ε̂), which is why DDIM is exact for straight paths; ``solver="heun"`` adds Heun's correction in the same
  variables (second order, 2 model calls per step, the last step to clean data Euler). ``time_type="continuous"``
  allows real timesteps (ᾱ interpolated in log space between the trained integer timesteps).

Where it differs from DDIMScheduler on purpose: the step always goes to the next timestep *listed* by
`set_timesteps`. DDIM steps to ``t − T//N`` whatever ``timestep_spacing`` says, so with "trailing" or "linspace"
spacing it lands between listed timesteps (the last step of N = 7 trailing goes from t = 141 to t = −1 in both, but
e.g. 999 → 857 instead of 999 → 856). With the default "leading" spacing the two agree.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..ops import udm
from ._validation import check_choice, timestep_not_in_schedule_error

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
SOLVERS = ("euler", "heun")
TIME_TYPES = ("discrete", "continuous")


@dataclass
class UDMSchedulerOutput(BaseOutput):
    """``prev_sample``: x_s; ``pred_original_sample``: the (clipped) x̂0 the step used."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class UDMScheduler(SchedulerMixin, ConfigMixin):
    """One diffusion sampler for DDPM, η-DDIM and the probability-flow ODE (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, trained_betas: the noise schedule, as in DDPMScheduler.
        beta_schedule: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` (alias ``cosine``), ``sigmoid``, or
            ``rectified_flow`` (a = 1 − σ, b = σ with σ = t/T, continuous time, for flow-matching models).
        prediction_type: ``epsilon``, ``sample``, ``v_prediction`` or ``flow_prediction`` (v = noise − data).
        eta: kernel noise as a fraction of the DDPM posterior std (0 = DDIM/ODE, 1 = DDPM). `step(eta=...)` overrides.
        variance_type: ``fixed_small`` (noise std σ) or ``fixed_large`` (noise std b_{t|s}, DDPM's upper bound).
        use_clipped_model_output: ε̂ from the clipped x̂0 (True, UDM and DDPM) or the model's own (False, DDIM).
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value: as in DDPM/DDIM.
        timestep_spacing, steps_offset: how `set_timesteps(N)` picks integer timesteps (as in DDPM/DDIM).
        set_alpha_to_one: the last step lands on clean data (a = 1) rather than on ᾱ_0.
        time_type: ``discrete`` (integer timesteps) or ``continuous`` (real timesteps; the default for rectified_flow).
        solver: ``euler`` (the UDM step above) or ``heun`` (probability-flow ODE, second order; needs η = 0).

    Example:
        >>> import hf_ext
        >>> from diffusers import DDPMScheduler
        >>> from hf_ext.schedulers import UDMScheduler
        >>> ddpm_like = UDMScheduler.from_config(DDPMScheduler().config, eta=1.0)
        >>> ddpm_like.set_timesteps(50)
        >>> ddpm_like.timesteps[:3].tolist()
        [980, 960, 940]
    """

    _compatibles = ["DDPMScheduler", "DDIMScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | np.ndarray | None = None,
        prediction_type: str = "epsilon",
        eta: float = 0.0,
        variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small",
        use_clipped_model_output: bool = True,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        time_type: Literal["discrete", "continuous"] | None = None,
        solver: Literal["euler", "heun"] = "euler",
    ):
        check_choice("beta_schedule", beta_schedule, udm.SCHEDULES)
        check_choice("prediction_type", prediction_type, udm.PREDICTION_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("solver", solver, SOLVERS)
        if solver == "heun" and eta != 0:
            raise ValueError(f"solver='heun' integrates the probability-flow ODE, so eta must be 0, got {eta}")
        if time_type is not None:
            check_choice("time_type", time_type, TIME_TYPES)
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if eta < 0 or eta > 1:
            raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}")
        self.flow_schedule = beta_schedule == "rectified_flow"
        if self.flow_schedule and time_type == "discrete":
            raise ValueError("beta_schedule='rectified_flow' is continuous-time; leave time_type unset or 'continuous'")
        self.continuous = self.flow_schedule or time_type == "continuous"
        if self.flow_schedule:
            self.alphas_cumprod = None
        else:
            if trained_betas is not None and len(trained_betas) != num_train_timesteps:
                raise ValueError(f"trained_betas has {len(trained_betas)} values, num_train_timesteps is "
                                 f"{num_train_timesteps}")
            self.alphas_cumprod = udm.vp_alphas_cumprod(num_train_timesteps, beta_schedule, beta_start, beta_end,
                                                        trained_betas)
        self.variance_preserving = not self.flow_schedule
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        # What a pipeline loops over (Heun: inner timesteps twice). Until set_timesteps() it is the training grid, as
        # in DDPM/DDIM; step() refuses to run before set_timesteps().
        self.timesteps = torch.arange(num_train_timesteps, 0, -1) if self.flow_schedule else torch.arange(
            num_train_timesteps - 1, -1, -1)
        self._schedule = None  # the distinct timesteps, in order
        self._schedule_values: list = []  # the same as Python numbers, for a cheap lookup in step()
        self._levels: dict[str, torch.Tensor] = {}  # per step: a², b² at t and at the step's target s
        self._coefficients: dict[tuple, list[tuple[float, ...]]] = {}  # per (eta, use_clipped): step coefficients
        self._heun_state = None  # (x_t, ε̂_t, a_t, b_t, s) between Heun's predictor and corrector calls

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    # ---- noise levels ---------------------------------------------------------------------------------------------
    def noise_levels(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t², b_t²) as float32 tensors for ``x_t = a_t·x0 + b_t·ε`` (VP: ᾱ_t and 1 − ᾱ_t); −1 means clean data.

        Squares are the primary quantities because DDPM/DDIM compute from ``alphas_cumprod`` directly; the step
        repeats their float32 operations so that parity is not blurred by rounding.
        """
        t = torch.as_tensor(timesteps)
        if self.flow_schedule:
            sigma = t.float() / self.config.num_train_timesteps
            sigma = torch.where(t < 0, torch.zeros_like(sigma), sigma)
            return (1.0 - sigma) ** 2, sigma**2
        if self.continuous and t.is_floating_point():
            alphas_cumprod = udm.interpolate_log_alphas_cumprod(self.alphas_cumprod, t.clamp(min=0)).float()
        else:
            alphas_cumprod = self.alphas_cumprod[t.long().clamp(min=0)]
        final = torch.ones(()) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        alphas_cumprod = torch.where(t < 0, final, alphas_cumprod)
        return alphas_cumprod, 1 - alphas_cumprod

    # ---- schedule -------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | list[float] | None = None) -> None:
        """Choose the timesteps: ``num_inference_steps`` spaced per ``timestep_spacing`` (continuous time: evenly
        from the top), or custom strictly decreasing ``timesteps``."""
        T = self.config.num_train_timesteps
        top = T if self.flow_schedule else T - 1
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            values = np.asarray(timesteps, dtype=np.float64)
            if values.ndim != 1 or len(values) == 0:
                raise ValueError("timesteps must be a non-empty 1-D list")
            if np.any(np.diff(values) >= 0):
                raise ValueError(f"timesteps must be strictly decreasing, got {list(timesteps)[:8]}")
            low = 0 if not self.flow_schedule else np.nextafter(0, 1)
            if values[0] > top or values[-1] < low:
                raise ValueError(f"timesteps must lie in [{'0' if not self.flow_schedule else '>0'}, {top}], "
                                 f"got [{values[-1]:g}, {values[0]:g}]")
            if not self.continuous and np.any(values != np.round(values)):
                raise ValueError("timesteps must be integers for time_type='discrete' (use time_type='continuous')")
        else:
            if not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {num_inference_steps}")
            values = self._spaced_timesteps(num_inference_steps)
        self.num_inference_steps = len(values)
        dtype = torch.float32 if self.continuous else torch.int64
        self._schedule = torch.from_numpy(values).to(dtype=dtype, device=device)
        self._schedule_values = self._schedule.tolist()
        self.timesteps = self._schedule
        schedule = self._schedule.cpu()
        alpha_prod_t, beta_prod_t = self.noise_levels(schedule)
        alpha_prod_s, beta_prod_s = self.noise_levels(torch.cat([schedule[1:], schedule.new_tensor([-1])]))
        self._levels = dict(alpha_prod_t=alpha_prod_t, beta_prod_t=beta_prod_t, alpha_prod_s=alpha_prod_s,
                            beta_prod_s=beta_prod_s)
        self._coefficients = {}
        if self.config.solver == "heun":
            self.timesteps = torch.cat([self._schedule[:1], self._schedule[1:].repeat_interleave(2)])
        self._heun_state = None

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        config = self.config
        T = config.num_train_timesteps
        if self.flow_schedule:  # FlowMatchEuler's default grid: σ from 1 to 1/T
            return np.linspace(T, 1, n)
        if self.continuous:
            return np.linspace(T - 1, 0, n)
        if config.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].copy()
        if config.timestep_spacing == "leading":
            return (np.arange(0, n) * (T // n))[::-1].astype(np.float64) + config.steps_offset
        return np.round(np.arange(T, 0, -T / n)) - 1  # trailing

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The timestep a step from ``timestep`` lands on: the next one listed, or −1 (clean data) after the last."""
        index = self._index_for_timestep(timestep)
        if index + 1 == len(self._schedule):
            return torch.tensor(-1, dtype=self._schedule.dtype)
        return self._schedule[index + 1]

    def _index_for_timestep(self, timestep) -> int:
        if self._schedule is None:
            raise ValueError("UDMScheduler.step() called before set_timesteps(); call "
                             "scheduler.set_timesteps(num_inference_steps) first")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"step() takes a single timestep, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        try:
            return self._schedule_values.index(timestep)
        except ValueError:
            raise timestep_not_in_schedule_error(timestep, self._schedule) from None

    def _step_coefficients(self, eta: float, use_clipped_model_output: bool) -> list[tuple[float, ...]]:
        """Per step (a_t, b_t, coefficient of x̂0, of x_t or ε̂, noise std) as Python floats, computed once per η
        with the float32 operations DDIM/DDPM use, so that stepping costs a few tensor operations."""
        key = (eta, use_clipped_model_output)
        if key not in self._coefficients:
            levels = self._levels
            a_t, b_t, a_s = levels["alpha_prod_t"] ** 0.5, levels["beta_prod_t"] ** 0.5, levels["alpha_prod_s"] ** 0.5
            one_step = udm.one_step_variance(levels["alpha_prod_t"], levels["beta_prod_t"], levels["alpha_prod_s"],
                                             levels["beta_prod_s"], self.variance_preserving)
            kernel_std = eta * udm.posterior_variance(one_step, levels["beta_prod_t"], levels["beta_prod_s"]) ** 0.5
            direction = (levels["beta_prod_s"] - kernel_std**2).clamp(min=0) ** 0.5
            if use_clipped_model_output:
                # ε̂ = (x_t − a_t·x̂0)/b_t folded into two coefficients (DDPM's form: no 1/b_t amplification of x_t)
                other = direction / b_t
                x0_coefficient = a_s - other * a_t
            else:
                other, x0_coefficient = direction, a_s
            noise_std = one_step**0.5 if self.config.variance_type == "fixed_large" else kernel_std
            noise_std[-1] = 0.0  # nothing is added on the step to clean data (DDPM: "t > 0")
            columns = (a_t, b_t, x0_coefficient, other, noise_std, a_s, levels["beta_prod_s"] ** 0.5)
            self._coefficients[key] = list(zip(*(column.tolist() for column in columns)))
        return self._coefficients[key]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- stepping -------------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float | None = None,
             use_clipped_model_output: bool | None = None, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> UDMSchedulerOutput | tuple:
        """One UDM step from ``timestep`` to `previous_timestep` (the equations of the module docstring).

        ``eta`` and ``use_clipped_model_output`` default to the config; ``variance_noise`` replaces the drawn z.
        """
        config = self.config
        eta = config.eta if eta is None else eta
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if config.solver == "heun" and eta != 0:
            raise ValueError(f"solver='heun' integrates the probability-flow ODE, so eta must be 0, got {eta}")
        if use_clipped_model_output is None:
            use_clipped_model_output = config.use_clipped_model_output
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        index = self._index_for_timestep(timestep)
        is_last = index + 1 == len(self._schedule_values)
        a_t, b_t, x0_coefficient, other_coefficient, noise_std, a_s, b_s = self._step_coefficients(
            eta, use_clipped_model_output)[index]

        # 1. predict: x̂0 and ε̂ from the model output
        x0, noise_estimate = udm.split_prediction(model_output, sample, a_t, b_t, config.prediction_type,
                                                  self.variance_preserving)
        if config.thresholding:
            x0 = udm.threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
        elif config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

        if self.config.solver == "heun" and (self._heun_state is not None or not is_last):
            if use_clipped_model_output:  # the slope dy/dτ = ε̂, consistent with the (clipped) x̂0
                noise_estimate = (sample - a_t * x0) / b_t
            return self._heun_step(index, sample, x0, noise_estimate, a_t, b_t, a_s, b_s, model_output.dtype,
                                   return_dict)

        # 2. correct: x_s = a_s·x̂0 + √(b_s² − σ²)·ε̂ + σ_noise·z, with ε̂ from the clipped x̂0 (use_clipped) or not
        other = sample if use_clipped_model_output else noise_estimate
        prev_sample = x0_coefficient * x0 + other_coefficient * other
        if noise_std > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + noise_std * variance_noise
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return UDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _heun_step(self, index, sample, x0, noise_estimate, a_t, b_t, a_s, b_s, dtype, return_dict):
        """Heun on dy/dτ = ε̂ with y = x/a, τ = b/a: the predictor is the Euler (DDIM) step to s; the corrector,
        called at s with the model's output there, restarts from x_t with the mean of both ε̂."""
        if self._heun_state is None:  # predictor: remember where we started
            self._heun_state = (sample, noise_estimate, a_t, b_t, self._schedule_values[index + 1])
            prev_sample = a_s * (sample / a_t) + (b_s - a_s * b_t / a_t) * noise_estimate
        else:
            start, start_noise, a_start, b_start, expected = self._heun_state
            if self._schedule_values[index] != expected:
                raise ValueError(f"Heun's corrector expected timestep {expected}, got "
                                 f"{self._schedule_values[index]}; loop over scheduler.timesteps in order")
            # This call's own timestep is the interval's end; its ε̂ was computed at the predictor's point there.
            mean_noise = 0.5 * (start_noise + noise_estimate)
            prev_sample = a_t * (start / a_start) + (b_t - a_t * b_start / a_start) * mean_noise
            self._heun_state = None
        prev_sample = prev_sample.to(dtype)
        if not return_dict:
            return (prev_sample, x0)
        return UDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # ---- forward process (training) ---------------------------------------------------------------------------
    def _levels_like(self, sample: torch.Tensor, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = torch.as_tensor(timesteps).reshape(-1).cpu()
        top = self.config.num_train_timesteps if self.flow_schedule else self.config.num_train_timesteps - 1
        if timesteps.min() < 0 or timesteps.max() > top:
            raise ValueError(f"timesteps must lie in [0, {top}], got [{timesteps.min().item():g}, "
                             f"{timesteps.max().item():g}]")
        alpha_prod, beta_prod = self.noise_levels(timesteps)
        a, b = alpha_prod**0.5, beta_prod**0.5
        shape = (-1, *([1] * (sample.ndim - 1)))
        return (a.to(sample.device, sample.dtype).reshape(shape), b.to(sample.device, sample.dtype).reshape(shape))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = a_t·x0 + b_t·ε for a timestep per sample (training)."""
        a, b = self._levels_like(original_samples, timesteps)
        return a * original_samples + b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v_prediction target a_t·ε − b_t·x0."""
        a, b = self._levels_like(sample, timesteps)
        return a * noise - b * sample
