"""UDMScheduler as a drop-in for diffusers' DDPMScheduler and DDIMScheduler: `from_config` gives the same sampler,
every option of theirs is honoured (or refused), and stepping matches theirs step by step under a seeded generator
for every combination of their options and η ∈ {0, 0.5, 1}."""

import inspect
import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from hf_ext.schedulers import UDMScheduler

DDIM_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DDPM_BETA_SCHEDULES = (*DDIM_BETA_SCHEDULES, "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLE_CLIPPING = ({"clip_sample": False}, {"clip_sample": True}, {"thresholding": True, "clip_sample": False})
SPACINGS = ("leading", "trailing", "linspace")
STEPS = 7  # T/N not an integer: DDIM's t − T//N leaves the listed grid for "trailing" and "linspace"
SHAPE = (2, 3, 4, 4)


def _model(sample: torch.Tensor, t, learned_variance: str | None = None) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: smooth in the sample, different at every timestep; with a learned
    variance it returns twice the channels (DDPM's convention), the second half in [−1, 1]."""
    output = torch.tanh(0.7 * sample) + 0.3 * torch.cos(sample + float(t) / 97.0)
    if learned_variance == "learned":
        return torch.cat([output, 0.02 * torch.sigmoid(sample)], dim=1)
    if learned_variance == "learned_range":
        return torch.cat([output, torch.tanh(sample - float(t) / 500.0)], dim=1)
    return output


def _trajectory(scheduler, steps=STEPS, learned_variance=None, **step_kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(SHAPE, generator=generator)
    if steps is not None:
        scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        output = _model(sample, t, learned_variance)
        sample = scheduler.step(output, t, sample, generator=generator, **step_kwargs).prev_sample
    return sample


THEIRS_NOT_FINITE = "only theirs is not finite"


def _mismatch(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> str | None:
    if ours.isfinite().all() and not theirs.isfinite().all():
        return THEIRS_NOT_FINITE
    if not torch.equal(ours.isfinite(), theirs.isfinite()):
        return "different non-finite entries"
    finite = theirs.isfinite()
    scale = max(1.0, theirs[finite].abs().max().item()) if finite.any() else 1.0
    error = ((ours - theirs)[finite].abs().max().item() / scale) if finite.any() else 0.0
    return None if error <= tolerance else f"max error {error:.2e} × {scale:.3g}"


# DDPM's own float32 coefficient β_t = 1 − ᾱ_t/ᾱ_{t−1} is known to ~5e-4 relative at the smallest t, which moves its
# samples by up to ~1e-4 there; UDM's coefficients are exact to float32 (see test_ddpm_small_t_coefficients below).
DDPM_TOLERANCE = 2e-4
DDIM_TOLERANCE = 2e-5


def _combinations(*axes):
    return list(itertools.product(*axes))


def test_every_ddpm_option_combination_samples_like_ddpm():
    variance_types = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
    failures = []
    for schedule, prediction, clipping, spacing, offset, zero_snr, variance in _combinations(
            DDPM_BETA_SCHEDULES, PREDICTION_TYPES, SAMPLE_CLIPPING, SPACINGS, (0, 1), (False, True), variance_types):
        if zero_snr and prediction == "epsilon":
            continue  # ε-prediction cannot recover x0 where ᾱ = 0; covered in test_zero_terminal_snr_is_honoured
        config = dict(beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing,
                      steps_offset=offset, rescale_betas_zero_snr=zero_snr, variance_type=variance, **clipping)
        ddpm = DDPMScheduler(**config)
        ours = UDMScheduler.from_config(ddpm.config)
        learned = variance if variance.startswith("learned") else None
        problem = _mismatch(_trajectory(ours, learned_variance=learned), _trajectory(ddpm, learned_variance=learned),
                            DDPM_TOLERANCE)
        if problem:
            failures.append(f"{config}: {problem}")
    assert failures == []


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_every_ddim_option_combination_samples_like_ddim(eta):
    failures, ddim_nan_at_zero_snr = [], []
    for schedule, prediction, clipping, spacing, offset, alpha_to_one, zero_snr, clipped_output in _combinations(
            DDIM_BETA_SCHEDULES, PREDICTION_TYPES, SAMPLE_CLIPPING, SPACINGS, (0, 1), (False, True), (False, True),
            (False, True)):
        if zero_snr and prediction == "epsilon":
            continue
        config = dict(beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing,
                      steps_offset=offset, set_alpha_to_one=alpha_to_one, rescale_betas_zero_snr=zero_snr,
                      **clipping)
        ddim = DDIMScheduler(**config)
        ours = UDMScheduler.from_config(ddim.config)
        step = dict(eta=eta, use_clipped_model_output=clipped_output)
        problem = _mismatch(_trajectory(ours, **step), _trajectory(ddim, **step), DDIM_TOLERANCE)
        if problem == THEIRS_NOT_FINITE and zero_snr and eta == 1:
            # At ᾱ_t = 0 and η = 1 the DDIM step's √(1 − ᾱ_s − σ²) is √0, which DDIM's float32 rounding can turn
            # into √(−1e-8) = NaN; UDM clamps at 0 and stays finite.
            ddim_nan_at_zero_snr.append(config)
        elif problem:
            failures.append(f"{config}, {step}: {problem}")
    assert failures == []


def test_ddpm_small_t_coefficients_are_exact():
    """The mean of a DDPM step t → t−1 is c0·x̂0 + ct·x_t; at t = 1 UDM's coefficients equal the float64 values
    computed from the same float32 ᾱ, DDPM's float32 c0 is off by ~5e-5."""
    ddpm = DDPMScheduler(clip_sample=False, prediction_type="sample")
    ours = UDMScheduler.from_config(ddpm.config)
    alphas = ddpm.alphas_cumprod.double()
    a_t, a_s = alphas[1], alphas[0]
    exact_c0 = (a_s.sqrt() * (1 - a_t / a_s) / (1 - a_t)).item()
    exact_ct = ((a_t / a_s).sqrt() * (1 - a_s) / (1 - a_t)).item()
    one, zero, no_noise = torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1, 1)
    ours_c0 = ours.step(one, 1, zero, variance_noise=no_noise).prev_sample.item()  # x̂0 = 1, x_t = 0
    ours_ct = ours.step(zero, 1, one, variance_noise=no_noise).prev_sample.item()  # x̂0 = 0, x_t = 1
    assert abs(ours_c0 - exact_c0) < 1e-7 and abs(ours_ct - exact_ct) < 1e-7
    float32 = ddpm.alphas_cumprod  # DDPM's own expression for c0, in its float32
    theirs_c0 = (float32[0] ** 0.5 * (1 - float32[1] / float32[0]) / (1 - float32[1])).item()
    assert abs(theirs_c0 - exact_c0) > 1e-5  # why DDPM_TOLERANCE is what it is


def test_from_config_reproduces_the_source_scheduler_and_keywords_win():
    ddpm = DDPMScheduler(variance_type="fixed_large")
    ours = UDMScheduler.from_config(ddpm.config)
    assert (ours.config.eta, ours.config.variance_type, ours.config.step_convention) == (1.0, "fixed_large", "ddpm")
    ddim = DDIMScheduler(set_alpha_to_one=False)
    ours = UDMScheduler.from_config(ddim.config)
    assert (ours.config.eta, ours.config.use_clipped_model_output, ours.config.step_convention,
            ours.config.set_alpha_to_one) == (0.0, False, "ddim", False)
    ours = UDMScheduler.from_config(ddpm.config, eta=0.0, step_convention="udm")
    assert (ours.config.eta, ours.config.step_convention) == (0.0, "udm")
    # A UDM configuration passed through DDIM and back is the same sampler, not DDIM's.
    udm = UDMScheduler(beta_schedule="squaredcos_cap_v2")
    back = UDMScheduler.from_config(DDIMScheduler.from_config(udm.config).config)
    assert dict(back.config) == dict(udm.config)


def test_from_pretrained_of_a_saved_ddpm_folder_samples_like_ddpm(tmp_path):
    ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ddpm.save_pretrained(tmp_path)
    ours = UDMScheduler.from_pretrained(tmp_path)
    assert ours.config.eta == 1.0
    assert _mismatch(_trajectory(ours, steps=10), _trajectory(ddpm, steps=10), DDPM_TOLERANCE) is None


def test_every_ddpm_and_ddim_option_is_a_udm_option():
    """Nothing of their configurations is dropped: every key is a constructor argument of UDMScheduler."""
    ours = set(inspect.signature(UDMScheduler.__init__).parameters)
    for peer in (DDPMScheduler, DDIMScheduler):
        assert set(inspect.signature(peer.__init__).parameters) <= ours, peer.__name__


def test_step_before_set_timesteps_walks_the_training_grid_like_ddpm():
    ddpm = DDPMScheduler()
    ours = UDMScheduler.from_config(ddpm.config)
    assert torch.equal(ours.timesteps, ddpm.timesteps)
    ours_sample = theirs_sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in (999, 998, 500, 2, 1, 0):
        ours_sample = ours.step(_model(ours_sample, t), t, ours_sample,
                                generator=torch.Generator().manual_seed(t)).prev_sample
        theirs_sample = ddpm.step(_model(theirs_sample, t), t, theirs_sample,
                                  generator=torch.Generator().manual_seed(t)).prev_sample
    assert _mismatch(ours_sample, theirs_sample, DDPM_TOLERANCE) is None


@pytest.mark.parametrize("convention", ["udm", "ddim"])
def test_a_timestep_that_is_not_listed_steps_to_t_minus_T_over_N_like_ddim(convention):
    ddim = DDIMScheduler(clip_sample=False)
    ours = UDMScheduler.from_config(ddim.config, step_convention=convention)
    ddim.set_timesteps(10)
    ours.set_timesteps(10)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in (1, 457, 999):
        assert t not in ours.timesteps.tolist()
        assert ours.previous_timestep(t).item() == t - 100
        expected = ddim.step(_model(sample, t), t, sample, eta=0.5, generator=torch.Generator().manual_seed(1))
        got = ours.step(_model(sample, t), t, sample, eta=0.5, generator=torch.Generator().manual_seed(1))
        assert _mismatch(got.prev_sample, expected.prev_sample, DDIM_TOLERANCE) is None


def test_zero_terminal_snr_is_honoured():
    for peer in (DDPMScheduler, DDIMScheduler):
        theirs = peer(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        ours = UDMScheduler.from_config(theirs.config)
        assert ours.config.rescale_betas_zero_snr is True
        assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod) and torch.equal(ours.betas, theirs.betas)
        assert ours.alphas_cumprod[-1].item() == 0.0
    # ε-prediction at ᾱ = 0 divides by zero in both: the first step from pure noise is not finite in either.
    ddim = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ours = UDMScheduler.from_config(ddim.config)
    assert not _trajectory(ours).isfinite().all() and not _trajectory(ddim).isfinite().all()


def test_get_variance_equals_the_peers():
    ddpm, ddim = DDPMScheduler(), DDIMScheduler()
    from_ddpm, from_ddim = UDMScheduler.from_config(ddpm.config), UDMScheduler.from_config(ddim.config)
    for t in (1, 487, 999):
        torch.testing.assert_close(from_ddpm._get_variance(t), ddpm._get_variance(t), rtol=1e-3, atol=1e-12)
    for t, s in ((420, 400), (980, 960), (487, 486), (999, 998)):
        torch.testing.assert_close(from_ddim._get_variance(t, s), ddim._get_variance(t, s), rtol=1e-3, atol=1e-12)


def test_fixed_large_log_is_fixed_large_where_ddpm_returns_nan():
    ddpm = DDPMScheduler(variance_type="fixed_large_log")
    assert not _trajectory(ddpm).isfinite().all()  # DDPM takes the square root of log β_t
    ours = UDMScheduler.from_config(ddpm.config)
    large = UDMScheduler.from_config(DDPMScheduler(variance_type="fixed_large").config)
    assert torch.equal(_trajectory(ours), _trajectory(large))


def test_options_udm_cannot_honour_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="variance_type='other' is not supported; choose one of 'fixed_small'"):
        UDMScheduler(variance_type="other")
    with pytest.raises(ValueError, match="variance_type='learned_range' is the variance of a DDPM step, so eta"):
        UDMScheduler(variance_type="learned_range", eta=0.5)
    with pytest.raises(ValueError, match="trained_betas has 2 values, num_train_timesteps is 1000"):
        UDMScheduler(trained_betas=[0.1, 0.3])
    learned = UDMScheduler(variance_type="learned", eta=1.0)
    learned.set_timesteps(5)
    with pytest.raises(ValueError, match="needs a model output with twice the sample's channels"):
        learned.step(torch.zeros(SHAPE), learned.timesteps[0], torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr applies to beta schedules"):
        UDMScheduler(beta_schedule="rectified_flow", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="solver='heun' steps between listed timesteps"):
        UDMScheduler(solver="heun", step_convention="ddim")
    assert len(UDMScheduler(num_train_timesteps=1).timesteps) == 1  # DDPM allows a one-step schedule too
