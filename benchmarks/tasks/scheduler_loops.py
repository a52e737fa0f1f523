"""The sampling loop of ``scheduler_step_overhead``: a diffusers pipeline's scheduler calls for one image, with a fake
model whose output is one fixed tensor, so that only the scheduler's own work remains."""

from collections.abc import Callable

import torch

SEED = 0  # initial sample and model output
GENERATOR_SEED = 1  # the sampling generator of the DDPM/DDIM loops, seeded alike on both sides


class SamplingRun:
    """One sampling run of ``scheduler`` with a fake model: ``set_timesteps(steps)``, then ``step()`` with the same
    precomputed ``model_output`` at every ``scheduler.timesteps``, from ``initial_sample``; returns the final sample.

    ``loop="flow"`` is the SD3/Flux pipelines' call (``return_dict=False``, no generator); ``loop="ddpm"`` is
    DDPMPipeline's and DDIMPipeline's (``generator=g``, ``.prev_sample``), with ``g`` re-seeded at the start of every
    run so that every run draws the same noise.
    """

    def __init__(self, scheduler, model_output: torch.Tensor, initial_sample: torch.Tensor, steps: int, *,
                 loop: str, step_kwargs: dict | None = None):
        self.scheduler, self.model_output, self.initial_sample, self.steps = (scheduler, model_output,
                                                                              initial_sample, steps)
        self.loop, self.step_kwargs = loop, dict(step_kwargs or {})
        self.generator = torch.Generator().manual_seed(GENERATOR_SEED) if loop == "ddpm" else None

    def __call__(self) -> torch.Tensor:
        scheduler, model_output, sample = self.scheduler, self.model_output, self.initial_sample
        scheduler.set_timesteps(self.steps)
        if self.loop == "flow":
            for t in scheduler.timesteps:
                sample = scheduler.step(model_output, t, sample, return_dict=False, **self.step_kwargs)[0]
        else:
            generator = self.generator.manual_seed(GENERATOR_SEED)
            for t in scheduler.timesteps:
                sample = scheduler.step(model_output, t, sample, generator=generator, **self.step_kwargs).prev_sample
        return sample

    def repeated(self, runs: int) -> Callable[[], torch.Tensor]:
        """A callable doing ``runs`` sampling runs (one timed call)."""
        if runs == 1:
            return self

        def call():
            for _ in range(runs):
                sample = self()
            return sample

        return call


def make_inputs(shape: list[int], seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial sample, fixed model output): two fp32 N(0, 1) tensors of ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
