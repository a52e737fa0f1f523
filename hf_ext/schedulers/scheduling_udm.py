"""UDMScheduler: DDPM, DDIM (any η) and the probability-flow ODE as one sampler of the unified diffusion model.

For ``x_t = a_t·x0 + b_t·ε`` (see `hf_ext.ops.udm`), each step from t to the next timestep s of the schedule is

    x̂0 = estimate from the model output (epsilon / sample / v_prediction / flow_prediction), clipped if configured
    ε̂  = (x_t − a_t·x̂0)/b_t                        (or the model's own ε with use_clipped_model_output=False)
    σ   = η · b_s·b_{t|s}/b_t                        (η = 0: DDIM / probability-flow ODE; η = 1: DDPM)
    x_s = a_s·x̂0 + √(b_s² − σ²)·ε̂ + σ_noise·z       (σ_noise = σ, or b_{t|s} for variance_type="fixed_large")

A drop-in for diffusers' schedulers (same generator ⇒ same samples, for every combination of their options and
η ∈ {0, 0.5, 1}; `tests/test_udm_conformance.py`): ``UDMScheduler.from_config(scheduler.config)`` of a

* ``DDPMScheduler`` configuration gives ``eta=1, step_convention="ddpm"`` with its ``variance_type`` (all six);
* ``DDIMScheduler`` configuration gives ``eta=0, use_clipped_model_output=False, step_convention="ddim"``; the
  pipeline's ``eta`` goes to `step`, as with DDIM.

Keywords given to `from_config` win. DDIM estimates noise from the *unclipped* model output by default; UDM's own
"predict then correct" uses the clipped x̂0, which is what DDPM does (with ``clip_sample=False`` the two coincide).
Like DDPM, `step` works before `set_timesteps` (on the training grid, t → t − 1); like DDIM, at a training timestep
that is not listed (t → t − T//N).

Probability-flow ODE: η = 0. The step is then Euler's method for the ODE written in y = x/a and τ = b/a
(dy/dτ = ε̂), which is why DDIM is exact for straight paths; ``solver="heun"`` adds Heun's correction in the same
variables (second order, 2 model calls per step, the last step to clean data Euler). ``time_type="continuous"``
allows real timesteps (ᾱ interpolated in log space between the trained integer timesteps).

``step_convention`` says where a step goes and when it adds noise. "udm" (the default of `UDMScheduler()`): to the
next *listed* timestep, no noise on the step to clean data. "ddpm": the same target, noise whenever t > 0 (DDPM adds
b_{t|s}·z even on a last step from t > 0 with fixed_large). "ddim": to ``t − T//N`` whatever ``timestep_spacing``
says, so with "trailing" or "linspace" it lands between listed timesteps (N = 7 trailing: 999 → 857, not 856).

Where it differs from them on purpose (each pinned by a test): an unknown ``variance_type`` is refused (DDPM treats
any other string as fixed_small); ``fixed_large_log`` gives fixed_large's noise (DDPM's step takes √(log β), NaN);
``trained_betas`` must have one value per training timestep (DDPM/DDIM index past the end otherwise); the DDPM step
coefficients are exact in float32 where DDPM's 1 − ᾱ_t/ᾱ_{t−1} loses digits at the smallest t (samples differ by up
to ~1e-4 there); at zero terminal SNR with η = 1, √(1 − ᾱ_s − σ²) is clamped at 0 where DDIM's rounding gives NaN.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._device import to_device
from .._validation import check_integer, check_number
from ..ops import udm
from ._device import element_value, refuse_if
from ._validation import check_choice, check_decreasing, timestep_not_in_schedule_error

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# DDPMScheduler's variance types. The "_log" ones give the same noise std as their plain twins (DDPM computes them
# through a logarithm; its fixed_large_log step takes the square root of log β, a NaN, so that one follows the plain
# twin rather than DDPM). The learned ones read the variance from the second half of the model output's channels.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
SOLVERS = ("euler", "heun")
TIME_TYPES = ("discrete", "continuous")
STEP_CONVENTIONS = ("udm", "ddpm", "ddim")
# What `from_config` assumes for a configuration saved by one of the schedulers UDM stands in for, unless the
# configuration or the caller says otherwise: the same sampler, stepped the same way.
SAMPLER_SETTINGS = ("eta", "use_clipped_model_output", "step_convention")
PEER_DEFAULTS = {
    "DDPMScheduler": {"eta": 1.0, "step_convention": "ddpm"},
    "DDIMScheduler": {"eta": 0.0, "use_clipped_model_output": False, "step_convention": "ddim"},
}


def _peer_of(config) -> str | None:
    """The scheduler class a configuration came from: its saved ``_class_name``, or (in memory, where diffusers
    does not record it) the DDPM/DDIM class whose constructor takes exactly the configuration's keys."""
    if not isinstance(config, dict):
        return None
    peers = {peer.__name__: set(inspect.signature(peer.__init__).parameters) - {"self"}
             for peer in (DDPMScheduler, DDIMScheduler)}
    keys = {key for key in config if not key.startswith("_")}
    if keys - set().union(*peers.values()):
        return None  # it carries settings of UDM's own (a UDM configuration passed through DDPM or DDIM and back)
    if "_class_name" in config:
        return config["_class_name"]
    return next((name for name, parameters in peers.items() if keys == parameters), None)


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
        variance_type: ``fixed_small`` (noise std σ) or ``fixed_large`` (noise std b_{t|s}, DDPM's upper bound), their
            ``_log`` twins (same noise), or DDPM's ``learned`` / ``learned_range`` (η = 1; the model output carries
            the variance in its second half of channels).
        use_clipped_model_output: ε̂ from the clipped x̂0 (True, UDM and DDPM) or the model's own (False, DDIM).
        clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value: as in DDPM/DDIM.
        timestep_spacing, steps_offset: how `set_timesteps(N)` picks integer timesteps (as in DDPM/DDIM).
        set_alpha_to_one: the last step lands on clean data (a = 1) rather than on ᾱ_0.
        rescale_betas_zero_snr: rescale the betas so that the last timestep is pure noise (Lin et al., 2024).
        time_type: ``discrete`` (integer timesteps) or ``continuous`` (real timesteps; the default for rectified_flow).
        solver: ``euler`` (the UDM step above) or ``heun`` (probability-flow ODE, second order; needs η = 0).
        step_convention: ``udm``, ``ddpm`` or ``ddim``: where a step goes and when it adds noise (module docstring).

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
        variance_type: str = "fixed_small",
        use_clipped_model_output: bool = True,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
        time_type: Literal["discrete", "continuous"] | None = None,
        solver: Literal["euler", "heun"] = "euler",
        step_convention: Literal["udm", "ddpm", "ddim"] = "udm",
    ):
        check_choice("beta_schedule", beta_schedule, udm.SCHEDULES)
        check_choice("prediction_type", prediction_type, udm.PREDICTION_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("solver", solver, SOLVERS)
        check_choice("step_convention", step_convention, STEP_CONVENTIONS)
        if solver == "heun" and eta != 0:
            raise ValueError(f"solver='heun' integrates the probability-flow ODE, so eta must be 0, got {eta}")
        if solver == "heun" and step_convention == "ddim":
            raise ValueError("solver='heun' steps between listed timesteps; use step_convention='udm' or 'ddpm'")
        if time_type is not None:
            check_choice("time_type", time_type, TIME_TYPES)
        if not 0 <= eta <= 1:  # written so that NaN fails too
            raise ValueError(f"eta must be in [0, 1] (0 = DDIM, 1 = DDPM), got {eta}")
        # NaN or inf in any of these would reach every step's coefficients or the clipping of x̂0.
        check_number("beta_start", beta_start, low=0)
        check_number("beta_end", beta_end, low=0)
        check_number("clip_sample_range", clip_sample_range, low=0, low_open=True)
        check_number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, low=0, high=1)
        check_number("sample_max_value", sample_max_value, low=0, low_open=True)
        check_integer("steps_offset", steps_offset, low=0)
        if variance_type in LEARNED_VARIANCE_TYPES and eta != 1:
            raise ValueError(f"variance_type={variance_type!r} is the variance of a DDPM step, so eta must be 1, "
                             f"got {eta}")
        self.flow_schedule = beta_schedule == "rectified_flow"
        check_integer("num_train_timesteps", num_train_timesteps, low=2 if self.flow_schedule else 1)
        if self.flow_schedule and time_type == "discrete":
            raise ValueError("beta_schedule='rectified_flow' is continuous-time; leave time_type unset or 'continuous'")
        if self.flow_schedule and rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr applies to beta schedules; rectified_flow already ends at pure "
                             "noise")
        if self.flow_schedule and variance_type in LEARNED_VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r} needs a beta schedule, not rectified_flow")
        self.continuous = self.flow_schedule or time_type == "continuous"
        if self.flow_schedule:
            self.betas = self.alphas_cumprod = None
        else:
            if trained_betas is not None and len(trained_betas) != num_train_timesteps:
                # DDPM/DDIM accept this and then index past the end of their schedule; refuse it here.
                raise ValueError(f"trained_betas has {len(trained_betas)} values, num_train_timesteps is "
                                 f"{num_train_timesteps}: give one beta per training timestep")
            if trained_betas is not None:
                betas = np.asarray(trained_betas, dtype=np.float64)
                bad = np.flatnonzero(~((betas >= 0) & (betas <= 1)))  # NaN fails both comparisons
                if len(bad):
                    raise ValueError(f"trained_betas must be finite numbers in [0, 1], got trained_betas[{bad[0]}] = "
                                     f"{betas[bad[0]]}")
            self.betas = udm.vp_betas(num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas,
                                      rescale_betas_zero_snr)
            self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.variance_preserving = not self.flow_schedule
        self._device_alphas_cumprod = None  # a copy of alphas_cumprod on the device add_noise last ran on
        self.init_noise_sigma = 1.0
        # diffusers drops settings left at their default when another scheduler class reads this configuration;
        # the ones that choose the sampler must travel along, so that UDM → DDIM → UDM comes back the same sampler
        # (otherwise `from_config` would take the DDIM configuration for a DDIM one and switch to DDIM's settings).
        defaults_used = self.config.get("_use_default_values")
        if defaults_used:
            self.register_to_config(_use_default_values=sorted(set(defaults_used) - set(SAMPLER_SETTINGS)))
        # Until set_timesteps() the schedule is the training grid, as in DDPM: step(t) goes to t − 1.
        T = num_train_timesteps
        self._use_schedule(np.arange(T, 0, -1.0) if self.flow_schedule else np.arange(T - 1, -1, -1.0), None)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config`, which also reproduces the scheduler a configuration came from: a DDPMScheduler
        configuration gives ``eta=1, step_convention="ddpm"``, a DDIMScheduler one ``eta=0,
        use_clipped_model_output=False, step_convention="ddim"`` — unless the configuration or a keyword says
        otherwise."""
        for key, value in PEER_DEFAULTS.get(_peer_of(config), {}).items():
            if key not in config:
                kwargs.setdefault(key, value)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

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
        table = self._alphas_cumprod_on(t.device)
        if self.continuous and t.is_floating_point():
            alphas_cumprod = udm.interpolate_log_alphas_cumprod(table, t.clamp(min=0)).float()
        else:
            alphas_cumprod = table[t.long().clamp(min=0)]
        final = torch.ones(()) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        alphas_cumprod = torch.where(t < 0, final, alphas_cumprod)
        return alphas_cumprod, 1 - alphas_cumprod

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        """ᾱ on ``device``: copied there once, not at every training step (the copy would wait for the device)."""
        if self.alphas_cumprod.device == device:
            return self.alphas_cumprod
        if self._device_alphas_cumprod is None or self._device_alphas_cumprod.device != device:
            self._device_alphas_cumprod = to_device(self.alphas_cumprod, device)
        return self._device_alphas_cumprod

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
            values = check_decreasing("timesteps", timesteps)
            low = 0 if not self.flow_schedule else np.nextafter(0, 1)
            if values[0] > top or values[-1] < low:
                raise ValueError(f"timesteps must lie in [{'0' if not self.flow_schedule else '>0'}, {top}], "
                                 f"got [{values[-1]:g}, {values[0]:g}]")
            if not self.continuous and np.any(values != np.round(values)):
                raise ValueError("timesteps must be integers for time_type='discrete' (use time_type='continuous')")
        else:
            check_integer("num_inference_steps", num_inference_steps)  # the range error below keeps its wording
            if not 1 <= num_inference_steps <= T:
                raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {num_inference_steps}")
            values = self._spaced_timesteps(num_inference_steps)
        self._use_schedule(values, len(values), device, custom=timesteps is not None)
        # The configured sampler's step coefficients now, not in the first step (another η: in its first step).
        self._coefficient_table(self.config.eta, self.config.use_clipped_model_output)

    def _use_schedule(self, values: np.ndarray, num_inference_steps: int | None, device=None, custom=False) -> None:
        """Store the listed timesteps, the timestep each step lands on (per ``step_convention``) and their levels."""
        self.num_inference_steps = num_inference_steps
        dtype = torch.float32 if self.continuous else torch.int64
        # Everything a step needs is computed here on the host, once per schedule: step() reads these Python
        # numbers and never a device tensor's value (that would make the host wait for the device at every step).
        schedule = torch.from_numpy(np.ascontiguousarray(values)).to(dtype=dtype)
        self._schedule = schedule  # on the host; `timesteps` is its copy on the device
        self._schedule_values = schedule.tolist()
        if self.config.step_convention == "ddim" and not custom and not self.continuous:
            targets = schedule - self._stride()  # DDIM: t − T//N, whatever the spacing listed
        else:
            targets = torch.cat([schedule[1:], schedule.new_tensor([-1])])
        self._targets = targets
        self._coefficients = {}  # per (eta, use_clipped_model_output): one row of step coefficients per timestep
        timesteps = schedule
        if self.config.solver == "heun":
            timesteps = torch.cat([schedule[:1], schedule[1:].repeat_interleave(2)])
        self._timestep_values = timesteps.tolist()  # the values of self.timesteps' elements (see _timestep_value)
        self.timesteps = timesteps.to(device)
        self._heun_state = None  # (x_t, ε̂_t, a_t, b_t, s) between Heun's predictor and corrector calls

    def _stride(self) -> int:
        """T // N: DDIM's step length, and where any convention goes from a timestep that is not listed."""
        return self.config.num_train_timesteps // (self.num_inference_steps or self.config.num_train_timesteps)

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
        """The timestep a step from ``timestep`` lands on (−1 or below: clean data): the next one listed, or
        t − T//N with ``step_convention="ddim"`` and for a discrete timestep that is not listed."""
        index = self._index_for_timestep(timestep)
        if index is not None:
            return self._targets[index]
        return torch.tensor(self._timestep_value(timestep) - self._stride(), dtype=self._schedule.dtype)

    def _timestep_value(self, timestep):
        """A timestep as a Python number. An element of ``self.timesteps`` (what pipelines pass) is looked up on the
        host; any other tensor is read, which on an accelerator waits for the device (as DDPM/DDIM do every step)."""
        known = element_value(timestep, self.timesteps, self._timestep_values)
        if known is not None:
            return known
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"step() takes a single timestep, got a tensor of shape {tuple(timestep.shape)}")
            return timestep.item()
        return timestep

    def _index_for_timestep(self, timestep) -> int | None:
        """The timestep's place in the schedule; None for a discrete training timestep that is not listed (it is
        stepped like DDPM/DDIM do); an error for anything else."""
        value = self._timestep_value(timestep)
        try:
            return self._schedule_values.index(value)
        except ValueError:
            pass
        T = self.config.num_train_timesteps
        if self.continuous or value != int(value) or not 0 <= value < T:
            raise timestep_not_in_schedule_error(timestep, self._schedule) from None
        return None

    def _step_row(self, index: int | None, timestep, eta: float, use_clipped_model_output: bool) -> tuple:
        """The step coefficients for ``timestep`` at ``index`` of the schedule (see `_coefficient_rows`); listed
        timesteps are computed once per schedule and η, others (index None) when they are stepped."""
        if index is None:
            t, s = (torch.tensor([float(self._timestep_value(value))]) for value in
                    (timestep, self.previous_timestep(timestep)))
            return self._coefficient_rows(t, s, eta, use_clipped_model_output)[0]
        return self._coefficient_table(eta, use_clipped_model_output)[index]

    def _coefficient_table(self, eta: float, use_clipped_model_output: bool) -> list[tuple]:
        """The rows of `_coefficient_rows` for every listed timestep, computed on the host once per schedule and η."""
        key = (eta, use_clipped_model_output)
        if key not in self._coefficients:
            self._coefficients[key] = self._coefficient_rows(self._schedule, self._targets, eta,
                                                             use_clipped_model_output)
        return self._coefficients[key]

    def _coefficient_rows(self, t: torch.Tensor, s: torch.Tensor, eta: float,
                          use_clipped_model_output: bool) -> list[tuple]:
        """Per step t → s: (a_t, b_t, coefficient of x̂0, of x_t or ε̂, noise std, a_s, b_s, b_{t|s}², posterior
        variance, whether the step adds noise) as Python numbers, with the float32 operations of DDPM/DDIM.

        √(b_s² − σ²) is computed as b_s·√(1 − η² + η²·r·b_s²/b_t²) with r = a_t²/a_s² (the same number): the direct
        form subtracts b_{t|s}², which float32 knows only to a few digits at small t (1 − ᾱ_t/ᾱ_s), while this one
        adds positive terms — and at η = 1 it is DDPM's own x_t coefficient √α_t·b_s²/b_t²."""
        alpha_prod_t, beta_prod_t = self.noise_levels(t)
        alpha_prod_s, beta_prod_s = self.noise_levels(s)
        a_t, b_t, a_s, b_s = alpha_prod_t**0.5, beta_prod_t**0.5, alpha_prod_s**0.5, beta_prod_s**0.5
        one_step = udm.one_step_variance(alpha_prod_t, beta_prod_t, alpha_prod_s, beta_prod_s,
                                         self.variance_preserving)
        posterior = udm.posterior_variance(one_step, beta_prod_t, beta_prod_s)
        kernel_std = eta * posterior**0.5
        if eta == 0 or self.config.step_convention == "ddim":
            direction = (beta_prod_s - kernel_std**2).clamp(min=0) ** 0.5  # DDIM's own operations
        else:
            ratio = alpha_prod_t / alpha_prod_s
            direction = b_s * ((1 - eta**2) + eta**2 * ratio * beta_prod_s / beta_prod_t) ** 0.5
        if use_clipped_model_output:
            # ε̂ = (x_t − a_t·x̂0)/b_t folded into two coefficients (DDPM's form: no 1/b_t amplification of x_t)
            other = direction / b_t
            x0_coefficient = a_s - other * a_t
        else:
            other, x0_coefficient = direction, a_s
        large = self.config.variance_type in ("fixed_large", "fixed_large_log")
        noise_std = one_step**0.5 if large else kernel_std
        convention = self.config.step_convention
        if convention == "udm":
            adds_noise = s >= 0  # nothing is added on a step to clean data
        elif convention == "ddpm":
            adds_noise = t > 0  # DDPM adds noise whenever t > 0, also on a last step from t > 0
        else:
            adds_noise = torch.ones_like(t, dtype=torch.bool)  # DDIM adds σ·z whenever η > 0
        noise_std = torch.where(adds_noise, noise_std, 0.0)
        columns = (a_t, b_t, x0_coefficient, other, noise_std, a_s, b_s, one_step, posterior, adds_noise)
        return list(zip(*(column.tolist() for column in columns)))

    def _get_variance(self, timestep, prev_timestep=None) -> torch.Tensor:
        """The variance of a DDPM step from ``timestep`` to ``prev_timestep`` (default: `previous_timestep`): the
        posterior variance, or b_{t|s}² for the fixed_large types — what DDPMScheduler/DDIMScheduler's method of the
        same name returns, for code written against them."""
        if self.config.variance_type in LEARNED_VARIANCE_TYPES:
            raise ValueError(f"variance_type={self.config.variance_type!r}: the variance comes from the model output")
        s = self.previous_timestep(timestep) if prev_timestep is None else prev_timestep
        row = self._coefficient_rows(torch.tensor([float(self._timestep_value(timestep))]),
                                     torch.tensor([float(self._timestep_value(s))]), 1.0, True)[0]
        large = self.config.variance_type in ("fixed_large", "fixed_large_log")
        return torch.tensor(row[7] if large else row[8], dtype=torch.float32)

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
        predicted_variance = None
        if config.variance_type in LEARNED_VARIANCE_TYPES:
            if eta != 1:
                raise ValueError(f"variance_type={config.variance_type!r} is the variance of a DDPM step, so eta "
                                 f"must be 1, got {eta}")
            if model_output.ndim < 2 or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={config.variance_type!r} needs a model output with twice the "
                                 f"sample's channels (prediction, then variance); got {tuple(model_output.shape)} "
                                 f"for a sample of {tuple(sample.shape)}")
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        index = self._index_for_timestep(timestep)
        is_last = index is not None and index + 1 == len(self._schedule_values)
        (a_t, b_t, x0_coefficient, other_coefficient, noise_std, a_s, b_s, one_step, posterior,
         adds_noise) = self._step_row(index, timestep, eta, use_clipped_model_output)

        # 1. predict: x̂0 and ε̂ from the model output
        x0, noise_estimate = udm.split_prediction(model_output, sample, a_t, b_t, config.prediction_type,
                                                  self.variance_preserving)
        if config.thresholding:
            x0 = udm.threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
        elif config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

        if self.config.solver == "heun" and (self._heun_state is not None or not is_last):
            if index is None:
                raise timestep_not_in_schedule_error(timestep, self._schedule)
            if use_clipped_model_output:  # the slope dy/dτ = ε̂, consistent with the (clipped) x̂0
                noise_estimate = (sample - a_t * x0) / b_t
            return self._heun_step(index, sample, x0, noise_estimate, a_t, b_t, a_s, b_s, model_output.dtype,
                                   return_dict)

        # 2. correct: x_s = a_s·x̂0 + √(b_s² − σ²)·ε̂ + σ_noise·z, with ε̂ from the clipped x̂0 (use_clipped) or not
        other = sample if use_clipped_model_output else noise_estimate
        prev_sample = x0_coefficient * x0 + other_coefficient * other
        if predicted_variance is not None and adds_noise:
            noise_std = self._learned_noise_std(predicted_variance, one_step, posterior)
        if adds_noise and (predicted_variance is not None or noise_std > 0):
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + noise_std * variance_noise
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return UDMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _learned_noise_std(self, predicted_variance: torch.Tensor, one_step: float, posterior: float) -> torch.Tensor:
        """The noise std of a step with a learned variance (DDPM's formulas): ``learned`` reads the variance itself;
        ``learned_range`` (improved DDPM) a value v ∈ [−1, 1] that interpolates log σ² between the posterior variance
        (v = −1) and b_{t|s}² (v = 1)."""
        if self.config.variance_type == "learned":
            return predicted_variance**0.5
        fraction = (predicted_variance + 1) / 2
        log_variance = fraction * math.log(one_step) + (1 - fraction) * math.log(max(posterior, 1e-20))
        return torch.exp(0.5 * log_variance)

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
        """(a_t, b_t) per sample, computed on the sample's device (a training step's timesteps never go to the host)."""
        timesteps = to_device(timesteps, sample.device).reshape(-1)
        top = self.config.num_train_timesteps if self.flow_schedule else self.config.num_train_timesteps - 1
        refuse_if(((timesteps < 0) | (timesteps > top)).any(),
                  lambda: f"timesteps must lie in [0, {top}], got [{timesteps.min().item():g}, "
                          f"{timesteps.max().item():g}]")
        alpha_prod, beta_prod = self.noise_levels(timesteps)
        a, b = alpha_prod**0.5, beta_prod**0.5
        shape = (-1, *([1] * (sample.ndim - 1)))
        return a.to(sample.dtype).reshape(shape), b.to(sample.dtype).reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = a_t·x0 + b_t·ε for a timestep per sample (training)."""
        a, b = self._levels_like(original_samples, timesteps)
        return a * original_samples + b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v_prediction target a_t·ε − b_t·x0."""
        a, b = self._levels_like(sample, timesteps)
        return a * noise - b * sample
