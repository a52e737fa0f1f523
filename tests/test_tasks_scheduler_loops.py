"""The sampling loop that scheduler_step_overhead times (benchmarks/tasks/scheduler_loops.py)."""

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from benchmarks.tasks.scheduler_loops import SamplingRun, make_inputs
from hf_ext.schedulers import ReFlowScheduler, UDMScheduler


def _run(scheduler, steps, loop):
    initial, model_output = make_inputs([1, 2, 4, 4])
    return SamplingRun(scheduler, model_output, initial, steps, loop=loop)


def test_sampling_run_is_one_set_timesteps_and_a_step_per_timestep():
    """The timed call: set_timesteps(N), then step() at every scheduler.timesteps (2N − 1 for Heun)."""
    ddpm = DDPMScheduler()
    cases = [(ReFlowScheduler(), "flow", 6), (FlowMatchEulerDiscreteScheduler(), "flow", 6),
             (ReFlowScheduler(solver="heun"), "flow", 11), (FlowMatchHeunDiscreteScheduler(), "flow", 11),
             (UDMScheduler.from_config(ddpm.config, eta=1.0), "ddpm", 6), (ddpm, "ddpm", 6)]
    for scheduler, loop, calls in cases:
        run = _run(scheduler, 6, loop)
        counted = []
        step = scheduler.step
        scheduler.step = lambda *args, _step=step, **kwargs: counted.append(1) or _step(*args, **kwargs)
        sample = run()
        assert len(counted) == calls == len(scheduler.timesteps) and sample.shape == (1, 2, 4, 4)


def test_ddpm_runs_are_repeatable():
    """The generator is re-seeded per run: two runs of one scheduler draw the same noise."""
    ddpm = DDPMScheduler()
    candidate, peer = _run(UDMScheduler.from_config(ddpm.config, eta=1.0), 5, "ddpm"), _run(ddpm, 5, "ddpm")
    torch.testing.assert_close(candidate(), candidate(), rtol=0, atol=0)
    torch.testing.assert_close(peer.repeated(3)(), peer(), rtol=0, atol=0)
    # the same noise on both sides: UDM reproduces DDPM from the same start
    torch.testing.assert_close(candidate(), peer(), rtol=0, atol=1e-5)
