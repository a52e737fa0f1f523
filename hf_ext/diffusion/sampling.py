"""Solving the flow ODE with a velocity model, and measuring how straight its paths are.

A *velocity model* is a diffusers model such as `UNet2DModel` (its output's ``.sample`` is read) or any callable
``model(sample, timesteps) -> velocity``. Its time input is ``σ·num_train_timesteps`` (as in diffusers' flow-matching
pipelines) and it predicts ``v = noise − data`` (see `hf_ext.ops.flow`).
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._validation import check_integer
from ..schedulers import ReFlowScheduler


def predict_velocity(model, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Call a velocity model on a batch; ``timesteps`` is a float tensor [batch] of σ·T. The velocity must have the
    sample's shape: another one is refused (it would broadcast against the sample or the loss's target)."""
    output = model(sample, timesteps)
    if hasattr(output, "sample"):
        output = output.sample
    elif isinstance(output, tuple):
        output = output[0]
    if output.shape != sample.shape:
        raise ValueError(f"the model's output has shape {tuple(output.shape)} but the sample has shape "
                         f"{tuple(sample.shape)}: a velocity model must return one value per sample value")
    return output


@dataclass
class FlowSolution:
    """``samples``: the end points (σ = 0); ``trajectory``: the states at every σ of the grid, start and end included
    (only when asked for); ``sigmas``: that grid; ``velocities``: the model's velocity at every Euler step."""

    samples: torch.Tensor
    trajectory: list[torch.Tensor] | None = None
    sigmas: list[float] | None = None
    velocities: list[torch.Tensor] | None = None


@torch.no_grad()
def solve_flow(model, noise: torch.Tensor, num_inference_steps: int = 32, solver: str = "euler",
               num_train_timesteps: int = 1000, return_trajectory: bool = False, batch_size: int | None = None,
               show_progress: bool = False) -> FlowSolution:
    """Integrate dx/dσ = v(x, σ) from ``noise`` (σ = 1) to σ = 0 in equal steps (σ = 1, (N−1)/N, …, 1/N, 0) with
    ``ReFlowScheduler(timestep_spacing="trailing")``.

    ``batch_size`` splits a large ``noise`` tensor into chunks (the results are concatenated).
    """
    check_integer("num_inference_steps", num_inference_steps, low=1)
    check_integer("batch_size", batch_size, low=1, allow_none=True)
    chunks = noise.split(batch_size) if batch_size else (noise,)
    parts = [_solve_chunk(model, chunk, num_inference_steps, solver, num_train_timesteps, return_trajectory)
             for chunk in tqdm(chunks, desc="solving the flow ODE", disable=not show_progress or len(chunks) == 1)]
    if len(parts) == 1:
        return parts[0]
    merged = FlowSolution(samples=torch.cat([p.samples for p in parts]), sigmas=parts[0].sigmas)
    if return_trajectory:
        merged.trajectory = [torch.cat(states) for states in zip(*(p.trajectory for p in parts))]
        merged.velocities = [torch.cat(states) for states in zip(*(p.velocities for p in parts))]
    return merged


def _solve_chunk(model, noise, num_steps, solver, num_train_timesteps, return_trajectory) -> FlowSolution:
    scheduler = ReFlowScheduler(num_train_timesteps=num_train_timesteps, solver=solver, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps, device=noise.device)
    sample, trajectory, velocities = noise, [noise], []
    for index, t in enumerate(scheduler.timesteps):
        velocity = predict_velocity(model, sample, t.expand(sample.shape[0]))
        sample = scheduler.step(velocity, t, sample).prev_sample
        if return_trajectory:
            # Heun's corrector calls land on the grid; its predictor calls do not (they are intermediate).
            lands_on_grid = solver == "euler" or index % 2 == 1 or index == len(scheduler.timesteps) - 1
            if lands_on_grid:
                trajectory.append(sample)
            if solver == "euler" or index % 2 == 0:
                velocities.append(velocity)
    # The host's copy of the σ grid (reading the device's would wait for the whole solve); Heun lists inner σ twice.
    sigmas = [sigma for index, sigma in enumerate(scheduler._sigma_values)
              if index == 0 or sigma != scheduler._sigma_values[index - 1]]
    if not return_trajectory:
        return FlowSolution(samples=sample, sigmas=sigmas)
    return FlowSolution(samples=sample, trajectory=trajectory, sigmas=sigmas, velocities=velocities)


def straightness(model, noise: torch.Tensor, num_inference_steps: int = 32, num_train_timesteps: int = 1000) -> float:
    """S = ∫ E‖(x_noise − x_data) − v(x_σ, σ)‖² dσ along the model's own Euler paths, averaged over dimensions.

    0 means every path is a straight line travelled at constant speed, so one Euler step is exact (Liu et al. 2023,
    the "straightness" of a flow). The integral is the mean over the ``num_inference_steps`` Euler points.
    """
    solution = solve_flow(model, noise, num_inference_steps, "euler", num_train_timesteps, return_trajectory=True)
    displacement = noise - solution.samples
    gaps = [((displacement - velocity) ** 2).flatten(1).mean(1) for velocity in solution.velocities]
    return torch.stack(gaps).mean().item()
