"""ReFlowScheduler: parity with diffusers' FlowMatchEulerDiscreteScheduler where that one is right, the documented
differences where it is not, Heun's order, the forward process, errors, saving and pipelines."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from diffusion_helpers import reload_pipeline_in_fresh_python, sampling_loop, tiny_unet
from hf_ext.ops.flow import dynamic_shift_mu, shift_sigmas
from hf_ext.schedulers import ReFlowScheduler

T = 1000


def _flux_sigmas(n):
    return list(np.linspace(1.0, 1 / n, n))


SCHEDULE_CASES = {
    "shift 1, default grid": ({}, dict(num_inference_steps=10)),
    "shift 3, custom sigmas (applied once by both)": (dict(shift=3.0), dict(sigmas=_flux_sigmas(10))),
    "dynamic mu, exponential (Flux)": (dict(use_dynamic_shifting=True),
                                       dict(sigmas=_flux_sigmas(10), mu=dynamic_shift_mu(1024))),
    "dynamic mu, linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"),
                           dict(sigmas=_flux_sigmas(10), mu=1.5)),
    "shift terminal": (dict(shift=2.0, shift_terminal=0.1), dict(sigmas=_flux_sigmas(10))),
    "karras": (dict(use_karras_sigmas=True, shift=3.0), dict(sigmas=_flux_sigmas(10))),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=10)),
    "beta": (dict(use_beta_sigmas=True), dict(num_inference_steps=10)),
    "inverted": (dict(invert_sigmas=True), dict(num_inference_steps=10)),
    "dynamic mu, default grid": (dict(use_dynamic_shifting=True), dict(num_inference_steps=10, mu=0.8)),
}


@pytest.mark.smoke
@pytest.mark.parametrize("case", sorted(SCHEDULE_CASES))
def test_schedule_equals_flow_match_euler(case):
    config, call = SCHEDULE_CASES[case]
    ours, theirs = ReFlowScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
    ours.set_timesteps(**call)
    theirs.set_timesteps(**call)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=1e-3, rtol=0)


@pytest.mark.parametrize("case", ["shift 1, default grid", "shift 3, custom sigmas (applied once by both)",
                                  "dynamic mu, exponential (Flux)"])
@pytest.mark.smoke
def test_euler_sampling_equals_flow_match_euler_with_a_unet(case):
    config, call = SCHEDULE_CASES[case]
    unet = tiny_unet()
    ours = sampling_loop(unet, ReFlowScheduler(**config), set_timesteps=call)
    theirs = sampling_loop(unet, FlowMatchEulerDiscreteScheduler(**config), set_timesteps=call)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(use_dynamic_shifting=True)], ids=["static", "dynamic"])
def test_training_grid_before_set_timesteps_equals_flow_match_euler(config):
    """diffusers' SD3/Flux training scripts draw noise levels from a fresh scheduler's timesteps and sigmas."""
    ours, theirs = ReFlowScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)
    assert ours.sigma_min == pytest.approx(theirs.sigma_min) and ours.sigma_max == theirs.sigma_max
    data, noise = torch.randn(2, 4), torch.randn(2, 4)
    t = ours.timesteps[[10, 700]]
    sigma = ours.sigmas[[10, 700]][:, None]
    torch.testing.assert_close(ours.scale_noise(data, t, noise), sigma * noise + (1 - sigma) * data)


def test_default_grid_is_shifted_once_where_flow_match_euler_shifts_its_end_twice():
    """diffusers#13243: FlowMatchEuler's sigma_min is already shifted when set_timesteps shifts the grid again."""
    shift, n = 3.0, 8
    ours, theirs = ReFlowScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    once = shift_sigmas(np.linspace(1.0, 1 / T, n), shift)
    twice = shift_sigmas(np.linspace(1.0, shift_sigmas(1 / T, shift), n), shift)
    np.testing.assert_allclose(ours.sigmas[:-1].numpy(), once, atol=1e-6)
    np.testing.assert_allclose(theirs.sigmas[:-1].numpy(), twice, atol=1e-6)
    assert ours.sigmas[-2].item() == pytest.approx(0.002994, abs=1e-6)
    assert theirs.sigmas[-2].item() == pytest.approx(0.008929, abs=1e-6)
    # Same ends, different interior: the difference is the documented one, not noise.
    assert ours.sigmas[0] == theirs.sigmas[0] == 1


def test_timesteps_without_sigmas_stay_consistent_with_the_sigmas():
    timesteps = [900.0, 500.0, 100.0]
    ours, theirs = ReFlowScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    torch.testing.assert_close(ours.sigmas[:-1] * T, ours.timesteps)  # σ·T is what the model is told
    assert not torch.allclose(theirs.sigmas[:-1] * T, theirs.timesteps)  # FlowMatchEuler shifts only the sigmas


def _gaussian_flow(mean: float, std: float):
    """Exact velocity of rectified flow from N(0, 1) noise to N(mean, std²) data, and the exact ODE end point."""

    def velocity(x, sigma):
        variance = sigma**2 + (1 - sigma) ** 2 * std**2
        return -mean + (sigma - (1 - sigma) * std**2) / variance * (x - (1 - sigma) * mean)

    return velocity, lambda noise: mean + std * noise


def _solve(scheduler, velocity, noise, n):
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / n, n)))
    x, calls = noise.clone(), 0
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t / T), t, x).prev_sample
        calls += 1
    return x, calls


def test_heun_is_second_order_and_euler_first_order_on_an_exact_flow():
    velocity, exact = _gaussian_flow(mean=2.0, std=0.3)
    noise = torch.linspace(-2, 2, 9, dtype=torch.float64)
    errors = {}
    for solver in ("euler", "heun"):
        for n in (8, 16, 32):
            x, calls = _solve(ReFlowScheduler(solver=solver), velocity, noise, n)
            assert calls == (n if solver == "euler" else 2 * n - 1)
            errors[solver, n] = (x - exact(noise)).abs().max().item()
    euler_rate = math.log2(errors["euler", 16] / errors["euler", 32])
    heun_rate = math.log2(errors["heun", 16] / errors["heun", 32])
    assert 0.8 < euler_rate < 1.2, errors
    assert 1.8 < heun_rate < 2.2, errors
    assert errors["heun", 16] < errors["euler", 32] / 3, errors  # at about the same number of model calls


def test_one_euler_step_maps_every_point_to_the_data_mean_of_an_oracle_flow():
    """The spec's analytic 2-D oracle: 1-RF is curved, so a single Euler step collapses samples to the mean."""
    modes = torch.tensor([[4.0, 0], [-4, 0], [0, 4], [0, -4]], dtype=torch.float64)

    def velocity(x, sigma):  # E[noise − data | x_σ], data a uniform mixture of point masses
        t = 1 - sigma
        logits = -((x[:, None] - t * modes[None]) ** 2).sum(-1) / (2 * sigma**2)
        data = torch.softmax(logits, dim=1) @ modes
        return (x - data) / sigma

    noise = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    distances = {}
    for n in (1, 2, 5, 20):
        x, _ = _solve(ReFlowScheduler(), velocity, noise, n)
        distances[n] = torch.cdist(x, modes).min(dim=1).values.mean().item()
    assert distances[1] == pytest.approx(4.0, abs=0.05)  # every sample lands near (0, 0)
    assert distances[2] == pytest.approx(0.97, abs=0.1)
    assert distances[5] < 1e-2 and distances[20] < 1e-6


def test_sample_prediction_equals_flow_prediction():
    velocity, _ = _gaussian_flow(mean=1.0, std=0.5)
    noise = torch.randn(16, dtype=torch.float64)
    flow, sample = ReFlowScheduler(), ReFlowScheduler(prediction_type="sample")
    for scheduler in (flow, sample):
        scheduler.set_timesteps(6)
    x_flow, x_sample = noise.clone(), noise.clone()
    for t in flow.timesteps:
        sigma = t / T
        x_flow = flow.step(velocity(x_flow, sigma), t, x_flow).prev_sample
        x_sample = sample.step(x_sample - sigma * velocity(x_sample, sigma), t, x_sample).prev_sample
    torch.testing.assert_close(x_flow, x_sample, atol=1e-5, rtol=0)


def test_scale_noise_is_the_forward_process_and_matches_flow_match_euler_in_img2img():
    data, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    timesteps = torch.tensor([0.0, 250.0, 1000.0])
    expected = torch.stack([(t / T) * n + (1 - t / T) * d for t, n, d in zip(timesteps, noise, data)])
    torch.testing.assert_close(ReFlowScheduler().scale_noise(data, timesteps, noise), expected)
    ours, theirs = ReFlowScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (ours, theirs):  # what an img2img pipeline does: start part-way down a schedule
        scheduler.set_timesteps(sigmas=_flux_sigmas(10))
        scheduler.set_begin_index(4)
    t = ours.timesteps[4:5]
    torch.testing.assert_close(ours.scale_noise(data, t, noise), theirs.scale_noise(data, t, noise))


def test_heun_in_a_pipeline_starts_mid_schedule_like_diffusers_heun():
    scheduler = ReFlowScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 7 and len(scheduler.sigmas) == 8
    assert scheduler.index_for_timestep(scheduler.timesteps[1]) == 2  # a repeated timestep resumes at its 2nd visit


@pytest.mark.parametrize("steps", [8, 50])
def test_heun_samples_equal_flow_match_heun_up_to_rounding(steps):
    """The same schedule and 2N − 1 step() calls; FlowMatchHeun recovers the slope from the model output as
    (x − (x − v·σ))/σ, which rounds, where ours uses v as it is: the samples agree to float32 rounding."""
    unet = tiny_unet()
    ours, theirs = ReFlowScheduler(solver="heun"), FlowMatchHeunDiscreteScheduler()
    ours_sample, theirs_sample = sampling_loop(unet, ours, steps), sampling_loop(unet, theirs, steps)
    assert len(ours.timesteps) == len(theirs.timesteps) == 2 * steps - 1
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=0)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours_sample, theirs_sample, atol=1e-4, rtol=0)


def test_bad_input_gets_clear_errors():
    scheduler = ReFlowScheduler()
    with pytest.raises(ValueError, match="before set_timesteps"):
        scheduler.step(torch.zeros(2), torch.tensor(1000.0), torch.zeros(2))
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 123.5 is not in the schedule"):
        scheduler.step(torch.zeros(2), torch.tensor(123.5), torch.zeros(2))
    with pytest.raises(ValueError, match="integer index"):
        scheduler.step(torch.zeros(2), 3, torch.zeros(2))
    with pytest.raises(ValueError, match="timestep must lie in \\[0, num_train_timesteps=1000\\]"):
        ReFlowScheduler().scale_noise(torch.zeros(1, 2), 1500.0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="prediction_type='epsilon' is not supported; choose one of"):
        ReFlowScheduler(prediction_type="epsilon")
    with pytest.raises(ValueError, match="solver='rk4'"):
        ReFlowScheduler(solver="rk4")
    with pytest.raises(ValueError, match="mu must be passed"):
        ReFlowScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="sigmas must lie in"):
        ReFlowScheduler().set_timesteps(sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match="same length"):
        ReFlowScheduler().set_timesteps(sigmas=[1.0, 0.5], timesteps=[1000.0])
    scheduler.set_timesteps(1)
    scheduler.step(torch.zeros(2), scheduler.timesteps[0], torch.zeros(2))
    with pytest.raises(ValueError, match="finished"):
        scheduler.step(torch.zeros(2), scheduler.timesteps[0], torch.zeros(2))


def test_config_round_trips_and_swaps_with_flow_match_euler(tmp_path):
    ours = ReFlowScheduler(shift=3.0, solver="heun", use_karras_sigmas=True)
    ours.save_pretrained(tmp_path)
    reloaded = ReFlowScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.config) == public(ours.config)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    assert theirs.config.shift == 3.0 and theirs.config.use_karras_sigmas
    back = ReFlowScheduler.from_config(theirs.config)
    # FlowMatchEuler ignores the keys it does not know but keeps them in its config, so the round trip is lossless.
    assert public(back.config) == public(ours.config)


@pytest.mark.smoke
def test_pipeline_saved_with_reflow_reloads_through_diffusion_pipeline(tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=ReFlowScheduler(solver="heun"))
    expected = pipeline(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                        output_type="np").images
    name, config, images = reload_pipeline_in_fresh_python(pipeline, tmp_path, num_inference_steps=3)
    assert name == "ReFlowScheduler" and config["solver"] == "heun"
    # another process may split the UNet's convolutions over threads differently: float32 rounding, not 1/255
    np.testing.assert_allclose(images, expected, atol=1e-5)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)  # in this process hf_ext is already imported
    assert isinstance(reloaded.scheduler, ReFlowScheduler)


def test_trailing_spacing_takes_equal_steps_for_few_step_sampling():
    trailing, linspace = ReFlowScheduler(timestep_spacing="trailing"), ReFlowScheduler()
    trailing.set_timesteps(2)
    linspace.set_timesteps(2)
    assert trailing.sigmas.tolist() == [1.0, 0.5, 0.0]
    assert linspace.sigmas.tolist() == pytest.approx([1.0, 1 / T, 0.0])  # FlowMatchEuler's grid: one real step
    shifted = ReFlowScheduler(timestep_spacing="trailing", shift=3.0)
    shifted.set_timesteps(4)
    np.testing.assert_allclose(shifted.sigmas[:-1].numpy(), shift_sigmas(np.array([1.0, 0.75, 0.5, 0.25]), 3.0),
                               rtol=1e-6)


def _flow_match_euler_draws_noise_from_its_generator() -> bool:
    """diffusers < 0.39 draws FlowMatchEuler's stochastic noise from the global RNG, ignoring `generator`."""
    scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    scheduler.set_timesteps(2)
    sample, velocity = torch.zeros(1, 4), torch.zeros(1, 4)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        scheduler._step_index = None
        draws.append(scheduler.step(velocity, scheduler.timesteps[0], sample,
                                    generator=torch.Generator().manual_seed(3)).prev_sample)
    return torch.equal(*draws)


def test_stochastic_sampling_equals_flow_match_euler():
    if not _flow_match_euler_draws_noise_from_its_generator():
        pytest.skip("the installed diffusers' FlowMatchEuler ignores `generator` in stochastic sampling (< 0.39): "
                    "no seeded reference to compare with")
    unet = tiny_unet()
    ours = sampling_loop(unet, ReFlowScheduler(stochastic_sampling=True), 6)
    theirs = sampling_loop(unet, FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 6)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
