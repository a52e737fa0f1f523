"""ReFlowScheduler: rectified-flow sampling (Euler or Heun), a drop-in for diffusers' FlowMatchEulerDiscreteScheduler.

Forward process ``x_σ = σ·noise + (1 − σ)·data``; the model predicts ``v = noise − data`` (``flow_prediction``) or the
clean sample (``sample``); `step` integrates dx/dσ = v from σ = 1 to σ = 0:

    Euler:  x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i)
    Heun:   x̃ = Euler step;  x_{i+1} = x_i + (σ_{i+1} − σ_i)·(v(x_i, σ_i) + v(x̃, σ_{i+1}))/2   (last interval: Euler)

It reads the same configuration keys as FlowMatchEulerDiscreteScheduler (so ``ReFlowScheduler.from_config(
flow_match.config)`` and back both work) and has the same `set_timesteps(num_inference_steps, device, sigmas, mu,
timesteps)`. Where the two differ, on purpose:

* The default σ grid is ``linspace(1, 1/T, N)`` shifted **once**. FlowMatchEuler shifts its grid's lower end twice
  (its ``sigma_min`` is already shifted when ``set_timesteps`` shifts again; diffusers#13243), so with a static shift
  ≠ 1 and no custom sigmas its last σ is larger than intended (shift 3, T = 1000: 0.0089 instead of 0.0030).
* ``timesteps`` passed without ``sigmas`` are taken as the model's time input and σ = timestep / T, unshifted: the two
  stay consistent (FlowMatchEuler shifts the sigmas derived from them but not the timesteps themselves).

Everywhere else (shift 1, custom sigmas with any shift, dynamic μ, terminal stretch, Karras/exponential/beta
spacing, inverted sigmas) it equals FlowMatchEuler; the tests pin both the parity and the differences.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._device import to_device
from .._validation import check_integer, check_number
from ..ops import flow
from ._device import element_value, refuse_if
from ._validation import check_choice, check_decreasing, timestep_not_in_schedule_error

PREDICTION_TYPES = ("flow_prediction", "sample")
SOLVERS = ("euler", "heun")


@dataclass
class ReFlowSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next (lower) noise level; ``pred_original_sample``: the data estimate
    x − σ·v at the current one (``step(..., return_dict=False)`` returns ``(prev_sample,)`` only, as FlowMatchEuler)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class ReFlowScheduler(SchedulerMixin, ConfigMixin):
    """Rectified-flow ODE sampler (Euler, or Heun with ``solver="heun"``) for flow-matching models.

    Args:
        num_train_timesteps: T; the model's time input is σ·T.
        shift: static shift s (SD3 uses 3.0): σ' = s·σ/(1 + (s − 1)σ), applied once.
        use_dynamic_shifting: shift by a resolution-dependent μ passed to `set_timesteps` (Flux) instead.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: the μ line of `hf_ext.ops.flow.dynamic_shift_mu`.
        invert_sigmas: run σ from 0 to 1 (inversion).
        shift_terminal: stretch the grid so that its last σ equals this value.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas: respace the grid between its ends (at most one).
        time_shift_type: ``"exponential"`` or ``"linear"`` form of the dynamic shift.
        stochastic_sampling: re-noise the data estimate to the next σ instead of the ODE step (Euler only).
        solver: ``"euler"`` (1 model call per step) or ``"heun"`` (2 per step, the last step 1; ``order = 2``).
        prediction_type: ``"flow_prediction"`` (v = noise − data) or ``"sample"`` (the model predicts the data).
        timestep_spacing: the default grid of `set_timesteps(N)`: ``"linspace"`` (FlowMatchEuler's: σ from 1 to 1/T,
            so with N = 2 the second step is only 1/T long) or ``"trailing"`` (σ = 1, (N−1)/N, …, 1/N: equal steps,
            what few-step sampling of a reflowed or distilled model needs).

    Example:
        >>> import hf_ext
        >>> from hf_ext.schedulers import ReFlowScheduler
        >>> scheduler = ReFlowScheduler(shift=3.0, solver="heun")
        >>> scheduler.set_timesteps(4)
        >>> scheduler.timesteps.shape  # Heun: the inner timesteps are visited twice
        torch.Size([7])
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        solver: Literal["euler", "heun"] = "euler",
        prediction_type: Literal["flow_prediction", "sample"] = "flow_prediction",
        timestep_spacing: Literal["linspace", "trailing"] = "linspace",
    ):
        check_choice("solver", solver, SOLVERS)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "trailing"))
        check_integer("num_train_timesteps", num_train_timesteps, low=1)
        check_number("shift", shift, low=0, low_open=True)  # NaN or inf would make every σ NaN
        # The μ line of dynamic shifting (read by pipelines); None is allowed, as in FlowMatchEuler.
        check_number("base_shift", base_shift, allow_none=True)
        check_number("max_shift", max_shift, allow_none=True)
        check_integer("base_image_seq_len", base_image_seq_len, low=1, allow_none=True)
        check_integer("max_image_seq_len", max_image_seq_len, low=1, allow_none=True)
        check_number("shift_terminal", shift_terminal, low=0, high=1, high_open=True, allow_none=True)
        if use_karras_sigmas + use_exponential_sigmas + use_beta_sigmas > 1:
            raise ValueError("at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True")
        if stochastic_sampling and solver == "heun":
            raise ValueError("stochastic_sampling=True works with solver='euler' only")
        self._shift = shift
        self.num_inference_steps = None  # None until set_timesteps(): step() refuses to run before it
        # The training grid, as FlowMatchEuler has at construction: diffusers' SD3/Flux training scripts index
        # `timesteps` and `sigmas` of a freshly loaded scheduler to draw noise levels.
        train_sigmas = np.linspace(1, num_train_timesteps, num_train_timesteps)[::-1] / num_train_timesteps
        if not use_dynamic_shifting:
            train_sigmas = flow.shift_sigmas(train_sigmas, shift)
        self.sigmas = torch.from_numpy(train_sigmas.astype(np.float32))
        self.timesteps = self.sigmas * num_train_timesteps
        self._timestep_values = self.timesteps.tolist()  # the values of self.timesteps' elements, on the host
        self._step_index = None
        self._begin_index = None
        self._heun_state = None  # (sample, velocity, sigma) between Heun's two calls
        self._sigma_values: list[float] = []

    # ---- the attributes pipelines read --------------------------------------------------------------------------
    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = check_number("shift", shift, low=0, low_open=True)

    @property
    def sigma_max(self) -> float:
        return 1.0

    @property
    def sigma_min(self) -> float:
        return float(flow.shift_sigmas(1 / self.config.num_train_timesteps, 1.0 if self.config.use_dynamic_shifting
                                       else self._shift))

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        return flow.time_shift(t, mu, self.config.time_shift_type, sigma)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # ---- schedule -------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """Build the σ grid (from 1 towards 0) for ``num_inference_steps`` steps, or from custom ``sigmas`` (shifted
        like FlowMatchEuler's) and/or ``timesteps`` (the model's time inputs; σ = timestep / T when alone).

        Custom ``sigmas`` and ``timesteps`` must be non-empty, finite and strictly decreasing (from noise towards
        data; ``invert_sigmas`` reverses the grid itself)."""
        config = self.config
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True "
                             "(hf_ext.ops.flow.dynamic_shift_mu computes it from the image sequence length)")
        custom = (("sigmas", sigmas), ("timesteps", timesteps))
        given = {name: check_decreasing(name, values) for name, values in custom if values is not None}
        lengths = {name: len(values) for name, values in given.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"sigmas and timesteps must have the same length, got {lengths}")
        if num_inference_steps is None:
            if not lengths:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = next(iter(lengths.values()))
        elif lengths and num_inference_steps not in lengths.values():
            raise ValueError(f"num_inference_steps={num_inference_steps} differs from the length of {lengths}")
        check_integer("num_inference_steps", num_inference_steps, low=1)
        T = config.num_train_timesteps

        if sigmas is None and timesteps is not None:
            # The timesteps are what the model sees; the σ the sampler moves through must agree with them.
            sigma_grid = given["timesteps"] / T
            self._check_grid(sigma_grid, "timesteps", scale=T)
        else:
            if sigmas is None:
                last = 1.0 / num_inference_steps if config.timestep_spacing == "trailing" else 1.0 / T
                sigma_grid = np.linspace(1.0, last, num_inference_steps)
            else:
                sigma_grid = given["sigmas"]
                self._check_grid(sigma_grid, "sigmas", scale=1)
            sigma_grid = self._shift_grid(sigma_grid, mu)
        sigma_grid = self._respace(sigma_grid, num_inference_steps)
        # Built on the host, where step() reads the σ as Python numbers (never the device's copy, which would make
        # the host wait for the device at every step), then moved to the device once.
        step_sigmas = torch.from_numpy(np.asarray(sigma_grid, dtype=np.float32))
        if timesteps is not None:
            step_timesteps = torch.tensor(np.asarray(timesteps, dtype=np.float32))
        else:
            step_timesteps = step_sigmas * T
        if config.invert_sigmas:
            step_sigmas = 1.0 - step_sigmas
            step_timesteps = step_sigmas * T
        end = torch.ones(1) if config.invert_sigmas else torch.zeros(1)

        if config.solver == "heun":  # every inner timestep is visited twice: Heun's corrector, then the next predictor
            step_timesteps = torch.cat([step_timesteps[:1], step_timesteps[1:].repeat_interleave(2)])
            step_sigmas = torch.cat([step_sigmas[:1], step_sigmas[1:].repeat_interleave(2)])
        self.num_inference_steps = num_inference_steps
        sigmas = torch.cat([step_sigmas, end])
        self._sigma_values = sigmas.tolist()  # float32 values as Python floats: step() reads these
        self._timestep_values = step_timesteps.tolist()
        self.timesteps = step_timesteps.to(device)
        self.sigmas = sigmas.to(device)
        self._step_index = None
        self._begin_index = None
        self._heun_state = None

    def _shift_grid(self, sigma_grid: np.ndarray, mu: float | None) -> np.ndarray:
        config = self.config
        if config.use_dynamic_shifting:
            sigma_grid = flow.time_shift(sigma_grid, mu, config.time_shift_type)
        else:
            sigma_grid = flow.shift_sigmas(sigma_grid, self._shift)
        if config.shift_terminal:
            sigma_grid = flow.stretch_to_terminal(sigma_grid, config.shift_terminal)
        return sigma_grid

    def _respace(self, sigma_grid: np.ndarray, num_steps: int) -> np.ndarray:
        config = self.config
        ends = (float(sigma_grid[-1]), float(sigma_grid[0]))
        if config.use_karras_sigmas:
            return flow.karras_sigmas(*ends, num_steps)
        if config.use_exponential_sigmas:
            return flow.exponential_sigmas(*ends, num_steps)
        if config.use_beta_sigmas:
            return flow.beta_sigmas(*ends, num_steps)
        return sigma_grid

    @staticmethod
    def _check_grid(values: np.ndarray, name: str, scale: float) -> None:
        """σ within [0, 1] (``values`` already passed `check_decreasing`)."""
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"{name} must lie in [0, {scale:g}], got [{values.min() * scale:g}, {values.max() * scale:g}]")

    # ---- stepping -------------------------------------------------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The place of ``timestep`` in the schedule; a timestep listed twice (Heun) is entered at its second
        occurrence (only a loop resumed mid-schedule starts there).

        An element of ``scheduler.timesteps`` (what pipelines pass) is found on the host. Any other tensor is
        compared on its device and read back, which on an accelerator waits for the device, once per sampling loop
        (as FlowMatchEuler does).
        """
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = element_value(timestep, schedule, self._timestep_values) if schedule is self.timesteps else None
        if value is not None:
            matches = [index for index, listed in enumerate(self._timestep_values) if listed == value]
            return matches[1 if len(matches) > 1 else 0]
        matches = (schedule == torch.as_tensor(timestep, dtype=schedule.dtype, device=schedule.device)).nonzero()
        if len(matches) == 0:
            raise timestep_not_in_schedule_error(timestep, schedule)
        return matches[1 if len(matches) > 1 else 0].item()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, per_token_timesteps: torch.Tensor | None = None,
             return_dict: bool = True) -> ReFlowSchedulerOutput | tuple:
        """Advance ``sample`` from the current σ to the next one of the schedule (see the module docstring).

        ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted for FlowMatchEuler's signature and, as
        there, unused.
        """
        if self.num_inference_steps is None:
            raise ValueError("ReFlowScheduler.step() called before set_timesteps(); call "
                             "scheduler.set_timesteps(num_inference_steps) first")
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by ReFlowScheduler "
                             "(use FlowMatchEulerDiscreteScheduler for per-token schedules)")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("step() takes one of scheduler.timesteps (floats), not an integer index")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        index, num_calls = self._step_index, len(self._sigma_values) - 1
        if index >= num_calls:
            raise ValueError(f"the schedule of {num_calls} calls is finished; call set_timesteps() again")

        config = self.config
        sigma, sigma_next = self._sigma_values[index], self._sigma_values[index + 1]
        work = sample.to(torch.float32)
        velocity = model_output.to(torch.float32)
        if config.prediction_type == "sample":
            velocity = (work - velocity) / sigma  # x_σ = σ·noise + (1−σ)·data  ⇒  v = (x_σ − data)/σ
        if self._heun_state is not None:  # Heun's corrector: average the slopes at both ends of the interval
            start, start_velocity, start_sigma = self._heun_state
            prev_sample = flow.heun_step(start, start_velocity, velocity, start_sigma, sigma)
            self._heun_state = None
        elif config.stochastic_sampling:
            noise = randn_tensor(work.shape, generator=generator, device=work.device, dtype=work.dtype)
            prev_sample = flow.add_flow_noise(work - sigma * velocity, noise, sigma_next)  # re-noise the estimate
        else:
            prev_sample = flow.euler_step(work, velocity, sigma, sigma_next)
            if config.solver == "heun" and index + 1 < num_calls:
                self._heun_state = (work, velocity, sigma)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:  # what SD3/Flux-style pipelines ask for: no data estimate to compute
            return (prev_sample,)
        return ReFlowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=work - sigma * velocity)

    # ---- forward process ------------------------------------------------------------------------------------------
    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """The forward process x_σ = σ·noise + (1 − σ)·sample, for training and img2img.

        ``timestep`` is a float or a tensor [batch] of model time inputs. Inside a pipeline (``set_begin_index``
        called) it is the schedule's σ at the begin index, as in FlowMatchEuler; otherwise σ = timestep / T for any
        timestep in [0, T] — a timestep need not be on the inference grid, so training can draw it freely.
        """
        T = self.config.num_train_timesteps
        # On the sample's device; a training step's timesteps are checked there too, never read back to the host.
        timestep = to_device(timestep, sample.device, torch.float32).reshape(-1)
        if self._begin_index is not None and self.num_inference_steps is not None:
            index = self._step_index if self._step_index is not None else self._begin_index
            sigma = timestep.new_full(timestep.shape, self._sigma_values[index])
        else:
            refuse_if(((timestep < 0) | (timestep > T)).any(),
                      lambda: f"timestep must lie in [0, num_train_timesteps={T}], got "
                              f"[{timestep.min().item():g}, {timestep.max().item():g}]")
            sigma = timestep / T
        return flow.add_flow_noise(sample, noise, sigma.to(sample.dtype))
