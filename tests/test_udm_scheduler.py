"""UDMScheduler: identical samples to diffusers' DDPM and DDIM schedulers, the unified formula against the DDPM
posterior in float64, flow models, continuous time, errors, saving and pipelines."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_helpers import reload_pipeline_in_fresh_python, sampling_loop, tiny_unet
from hf_ext.ops import udm
from hf_ext.schedulers import UDMScheduler

PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def _pipeline_images(scheduler, steps=25):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                    output_type="np").images


@pytest.mark.smoke
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_pipeline_samples_equal_ddpm_scheduler(prediction_type, variance_type):
    ddpm = DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type)
    expected = _pipeline_images(ddpm)
    ours = _pipeline_images(UDMScheduler.from_config(ddpm.config, eta=1.0))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddpm_equality_holds_for_other_spacings_and_schedules(spacing):
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing, clip_sample=False)
    np.testing.assert_allclose(_pipeline_images(UDMScheduler.from_config(ddpm.config, eta=1.0)),
                               _pipeline_images(ddpm), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_in_ddpm_pipeline_equals_ddim_scheduler(prediction_type):
    ddim = DDIMScheduler(prediction_type=prediction_type)
    expected = _pipeline_images(ddim)
    ours = _pipeline_images(UDMScheduler.from_config(ddim.config, use_clipped_model_output=False))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.smoke
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eta_ddim_equals_ddim_scheduler(prediction_type, eta, clip_sample):
    """DDIMPipeline's loop with eta > 0 (DDIMPipeline itself would convert our scheduler into a DDIMScheduler)."""
    ddim = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip_sample)
    unet = tiny_unet()
    expected = sampling_loop(unet, ddim, 25, eta=eta)
    ours = sampling_loop(unet, UDMScheduler.from_config(ddim.config, use_clipped_model_output=False), 25, eta=eta)
    scale = max(1.0, expected.abs().max().item())  # unclipped ε-models with random weights reach |x| ~ 1e2
    torch.testing.assert_close(ours / scale, expected / scale, atol=1e-5, rtol=0)


def test_udm_noise_estimate_from_the_clipped_sample_is_ddims_use_clipped_model_output():
    ddim = DDIMScheduler()
    unet = tiny_unet()
    expected = sampling_loop(unet, ddim, 10, eta=0.5, use_clipped_model_output=True)
    ours = sampling_loop(unet, UDMScheduler.from_config(ddim.config, use_clipped_model_output=True), 10, eta=0.5)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def _float64_linear_schedule(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return betas, torch.cumprod(1 - betas, 0)


def test_unified_step_is_the_ddpm_posterior_in_float64():
    """Su's σ_t = b_{t−1}·b_{t|t−1}/b_t with the UDM mean equals DDPM's posterior N(μ̃, β̃) at every t."""
    betas, alphas_cumprod = _float64_linear_schedule()
    x0, xt = torch.randn(999, 4, dtype=torch.float64), torch.randn(999, 4, dtype=torch.float64)
    t = torch.arange(1, 1000)
    ac_t, ac_s = alphas_cumprod[t], alphas_cumprod[t - 1]
    one_step = udm.one_step_variance(ac_t, 1 - ac_t, ac_s, 1 - ac_s, variance_preserving=True)
    sigma = udm.posterior_variance(one_step, 1 - ac_t, 1 - ac_s).sqrt()
    # DDPM (Ho et al., eq. 7): β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t; μ̃ = √ᾱ_{t−1}β_t/(1 − ᾱ_t)·x0 + √α_t(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t
    torch.testing.assert_close(one_step, betas[t], rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma**2, (1 - ac_s) / (1 - ac_t) * betas[t], rtol=1e-12, atol=0)
    c0 = (ac_s.sqrt() * betas[t] / (1 - ac_t))[:, None]
    ct = ((1 - betas[t]).sqrt() * (1 - ac_s) / (1 - ac_t))[:, None]
    eps_hat = (xt - ac_t.sqrt()[:, None] * x0) / (1 - ac_t).sqrt()[:, None]
    udm_mean = ac_s.sqrt()[:, None] * x0 + ((1 - ac_s) - sigma**2).sqrt()[:, None] * eps_hat
    torch.testing.assert_close(udm_mean, c0 * x0 + ct * xt, rtol=0, atol=1e-12)
    assert sigma[499].item() == pytest.approx(0.100256350317, abs=1e-11)  # the spec's value at t = 500


def test_ddim_with_the_true_x0_retraces_the_forward_trajectory():
    scheduler = UDMScheduler(clip_sample=False)
    scheduler.set_timesteps(20)
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    x = scheduler.add_noise(x0, noise, scheduler.timesteps[:1].repeat(4))
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(noise, t, x).prev_sample  # the exact ε of this trajectory
        if i + 1 < len(scheduler.timesteps):
            torch.testing.assert_close(x, scheduler.add_noise(x0, noise, scheduler.timesteps[i + 1].repeat(4)),
                                       atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_flow_prediction_on_the_rectified_flow_schedule_is_flow_match_euler():
    """DDIM on a = 1 − σ, b = σ with v = noise − data is exactly Euler on dx/dσ = v."""
    unet = tiny_unet()
    theirs = FlowMatchEulerDiscreteScheduler()
    expected = sampling_loop(unet, theirs, 12)
    ours = UDMScheduler(beta_schedule="rectified_flow", prediction_type="flow_prediction", clip_sample=False)
    result = sampling_loop(unet, ours, set_timesteps=dict(timesteps=theirs.timesteps.tolist()))
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    ours.set_timesteps(12)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)  # the same default grid, too


def test_flow_prediction_on_a_vp_schedule_recovers_x0_and_noise():
    scheduler = UDMScheduler(prediction_type="flow_prediction")
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for t in (10, 500, 990):
        ac = scheduler.alphas_cumprod[t].double()
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        x0_hat, noise_hat = udm.split_prediction(noise - x0, xt, ac.sqrt(), (1 - ac).sqrt(), "flow_prediction")
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(noise_hat, noise)


def test_continuous_time_equals_discrete_at_integer_timesteps_and_interpolates_between():
    discrete, continuous = UDMScheduler(), UDMScheduler(time_type="continuous")
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    torch.testing.assert_close(continuous.noise_levels(t)[0], discrete.noise_levels(t.long())[0])
    middle = continuous.noise_levels(torch.tensor([17.5]))[0]
    low, high = discrete.noise_levels(torch.tensor([18, 17]))[0]
    assert low < middle < high
    continuous.set_timesteps(timesteps=[999.0, 640.5, 200.25, 3.5])
    assert continuous.timesteps.dtype == torch.float32
    out = continuous.step(torch.zeros(1, 2), continuous.timesteps[1], torch.ones(1, 2)).prev_sample
    assert torch.isfinite(out).all()


def test_steps_go_to_the_next_listed_timestep_where_ddim_uses_t_minus_T_over_N():
    ours, ddim = UDMScheduler(timestep_spacing="trailing"), DDIMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(7)
    ddim.set_timesteps(7)
    assert ours.timesteps.tolist() == ddim.timesteps.tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert ours.previous_timestep(999).item() == 856
    assert 999 - ddim.config.num_train_timesteps // ddim.num_inference_steps == 857  # DDIM's step rule


@pytest.mark.parametrize("steps", [1, 2, 4, 32])
def test_trailing_ddim_on_1024_timesteps_is_reproduced_bit_for_bit(steps):
    """With T = 1024, T/N is an integer for every N here, so DDIM's step t → t − T//N lands on UDM's next listed
    timestep; "trailing" starts even the one-step grid at pure noise. UDM built from DDIM's config (without the
    clipped-sample noise estimate) gives the very same floats, its default within 1e-4 (another float order)."""
    config = dict(num_train_timesteps=1024, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  timestep_spacing="trailing", prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True,
                  steps_offset=0)
    ddim, udm = DDIMScheduler(**config), UDMScheduler(**config, eta=0.0)
    same_form = UDMScheduler.from_config(ddim.config, use_clipped_model_output=False, eta=0.0)
    assert torch.equal(udm.alphas_cumprod, ddim.alphas_cumprod)
    unet = tiny_unet()
    expected = sampling_loop(unet, ddim, steps, eta=0.0)
    assert torch.equal(sampling_loop(unet, same_form, steps, eta=0.0), expected)
    default = sampling_loop(unet, udm, steps, eta=0.0)
    assert torch.equal(udm.timesteps, ddim.timesteps) and ddim.timesteps[0].item() == 1023
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(default / scale, expected / scale, atol=1e-4, rtol=0)


def test_training_helpers_equal_ddpm():
    ddpm, ours = DDPMScheduler(beta_schedule="scaled_linear"), UDMScheduler(beta_schedule="scaled_linear")
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 400, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ddpm.get_velocity(x0, noise, t))


def test_custom_betas_are_used():
    betas = np.linspace(1e-3, 0.05, 50)
    scheduler = UDMScheduler(num_train_timesteps=50, trained_betas=betas)
    torch.testing.assert_close(scheduler.alphas_cumprod, torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))


def test_bad_input_gets_clear_errors():
    scheduler = UDMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 998.5 is not in the schedule"):
        scheduler.step(torch.zeros(1), 998.5, torch.zeros(1))
    with pytest.raises(ValueError, match="timestep 1000 is not in the schedule"):
        scheduler.step(torch.zeros(1), 1000, torch.zeros(1))
    with pytest.raises(ValueError, match="prediction_type='x0' is not supported; choose one of"):
        UDMScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        UDMScheduler(eta=1.5)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\]"):
        scheduler.step(torch.zeros(1), 900, torch.zeros(1), eta=-0.1)
    with pytest.raises(ValueError, match="beta_schedule='quadratic'"):
        UDMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="timesteps must lie in \\[0, 999\\]"):
        scheduler.set_timesteps(timesteps=[1200, 20])
    with pytest.raises(ValueError, match="integers"):
        scheduler.set_timesteps(timesteps=[500.5, 20])
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        scheduler.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1000]))
    with pytest.raises(ValueError, match="continuous-time"):
        UDMScheduler(beta_schedule="rectified_flow", time_type="discrete")


@pytest.mark.smoke
def test_config_round_trips_and_swaps_with_ddpm_and_ddim(tmp_path):
    ours = UDMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", eta=0.5,
                        variance_type="fixed_large")
    ours.save_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(UDMScheduler.from_pretrained(tmp_path).config) == public(ours.config)
    for other in (DDPMScheduler, DDIMScheduler):
        swapped = other.from_config(ours.config)
        assert swapped.config.prediction_type == "v_prediction"
        torch.testing.assert_close(swapped.alphas_cumprod, ours.alphas_cumprod)
        assert public(UDMScheduler.from_config(swapped.config).config) == public(ours.config)


def test_pipeline_saved_with_udm_reloads_through_diffusion_pipeline(tmp_path):
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=UDMScheduler(eta=1.0))
    expected = pipeline(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                        output_type="np").images
    name, config, images = reload_pipeline_in_fresh_python(pipeline, tmp_path, num_inference_steps=5)
    assert name == "UDMScheduler" and config["eta"] == 1.0
    # another process may split the UNet's convolutions over threads differently: float32 rounding, not 1/255
    np.testing.assert_allclose(images, expected, atol=1e-5)


def _gaussian_epsilon_model(scheduler, mean, std):
    """Exact E[ε | x_t] when the data are N(mean, std²): b/(a²std² + b²)·(x − a·mean)."""

    def epsilon(x, t):
        alpha_prod, beta_prod = scheduler.noise_levels(torch.as_tensor(t))
        a, b = alpha_prod.double() ** 0.5, beta_prod.double() ** 0.5
        return b / (a * a * std**2 + b * b) * (x - a * mean)

    return epsilon


def test_probability_flow_ode_heun_is_second_order_and_ddim_first_order():
    """On Gaussian data the ODE maps the standardised noise z to mean + std·z exactly."""
    mean, std = 1.5, 0.2
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    errors = {}
    for solver in ("euler", "heun"):
        for n in (10, 20, 40):
            scheduler = UDMScheduler(solver=solver, clip_sample=False, time_type="continuous")
            scheduler.set_timesteps(timesteps=list(np.linspace(999, 0, n)))
            epsilon = _gaussian_epsilon_model(scheduler, mean, std)
            alpha_prod, beta_prod = scheduler.noise_levels(torch.tensor(999.0))
            a, b = alpha_prod.double() ** 0.5, beta_prod.double() ** 0.5
            x = a * mean + (a * a * std**2 + b * b).sqrt() * z
            calls = 0
            for t in scheduler.timesteps:
                x = scheduler.step(epsilon(x, t), t, x).prev_sample
                calls += 1
            assert calls == (n if solver == "euler" else 2 * n - 1)
            errors[solver, n] = (x - (mean + std * z)).abs().max().item()
    euler_rate = np.log2(errors["euler", 20] / errors["euler", 40])
    heun_rate = np.log2(errors["heun", 20] / errors["heun", 40])
    assert 0.7 < euler_rate < 1.3 and heun_rate > 1.7, errors
    assert errors["heun", 20] < errors["euler", 40] / 1.5, errors  # 39 vs 40 model calls


def test_heun_needs_eta_zero_and_the_steps_in_order():
    with pytest.raises(ValueError, match="solver='heun' integrates the probability-flow ODE, so eta must be 0"):
        UDMScheduler(solver="heun", eta=0.5)
    scheduler = UDMScheduler(solver="heun")
    scheduler.set_timesteps(4)
    assert scheduler.order == 2 and scheduler.timesteps.tolist() == [750, 500, 500, 250, 250, 0, 0]
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="eta must be 0, got 0.5"):
        scheduler.step(x, 750, x, eta=0.5)
    scheduler.step(x, 750, x)
    with pytest.raises(ValueError, match="Heun's corrector expected timestep 500, got 250"):
        scheduler.step(x, 250, x)


def test_heun_honours_use_clipped_model_output_given_to_step():
    """The step argument and the config field are the same switch, for Heun as for the first-order step."""
    unet = tiny_unet()
    by_config = sampling_loop(unet, UDMScheduler(solver="heun", use_clipped_model_output=False), 4)
    by_argument = sampling_loop(unet, UDMScheduler(solver="heun"), 4, use_clipped_model_output=False)
    clipped = sampling_loop(unet, UDMScheduler(solver="heun"), 4)
    torch.testing.assert_close(by_argument, by_config, rtol=0, atol=0)
    assert not torch.allclose(clipped, by_config)  # the random UNet's x̂0 is clipped, so the switch matters
