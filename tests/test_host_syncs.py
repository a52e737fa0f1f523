"""No host syncs where users on CUDA run per forward or per step: RoPE-Tie positions, the UDM and ReFlow sampling
loops with the tensor timesteps a pipeline passes, their add_noise / scale_noise, and the reflow training step (whose
one documented sync is reading the loss). `_host_sync_detector.HostSyncDetector` sees on the CPU what would make the
host wait for a GPU.

The schedulers' value checks of device tensors are queued on CUDA (`torch._assert_async`) and read on the CPU, where
reading is free; the `queued_checks` fixture gives the CPU tensors here the CUDA behaviour. RoPE-Tie's checks of
user inputs read one flag each on every device, so that malformed inputs get a ValueError naming the problem.
"""

import pytest
import torch
from _host_sync_detector import HostSyncDetector, HostSyncError
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from benchmarks.tasks.digit_canvas import build_processor
from hf_ext import HfExtConfig, HfExtForCausalLM
from hf_ext.diffusion import FlowTrainingArguments, ReflowPairs, distill, train_rectified_flow, train_reflow
from hf_ext.models.hfext import positions_hfext
from hf_ext.schedulers import ReFlowScheduler, UDMScheduler, _device

LAYOUTS = ["flatten", "mrope", "rope_tie_v1", "rope_tie_v2"]


@pytest.fixture
def queued_checks(monkeypatch):
    """The schedulers' checks of tensor values take their CUDA form: queued with torch._assert_async, never read on
    the host."""
    monkeypatch.setattr(_device, "queues_checks", lambda device: True)


# ---- (a) RoPE-Tie positions ---------------------------------------------------------------------------------------
def _image_model_and_batch(layout):
    processor = build_processor(patch_size=2)
    config = HfExtConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, position_layout=layout, pad_token_id=0, eos_token_id=2,
                         bos_token_id=None, **processor.model_config_kwargs)
    torch.manual_seed(0)
    model = HfExtForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    images = [[torch.rand(4, 6, generator=generator)],  # left-padded rows, two images back to back in the second
              [torch.rand(2, 4, generator=generator), torch.rand(6, 2, generator=generator)],
              [torch.rand(6, 6, generator=generator)]]
    texts = ["what is <image> at row 1 col 2 ?", "<image> <image> left of 3 ?", "<image> above 7 ?"]
    return model, processor(text=texts, images=images)


CHECK_FLAG_READ = ("aten._local_scalar_dense.default: reads a value (.item(), bool(), int(), float(), or a tensor "
                   "index)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_tie_positions_and_rotary_tables_read_only_their_check_flags(layout):
    """Positions are built on the inputs' device; the host reads back the two flags of the checks (marker pairs,
    grids), which name malformed inputs with a ValueError, and nothing else."""
    model, batch = _image_model_and_batch(layout)
    ids, grids, attention_mask = batch["input_ids"], batch["image_grid_hw"], batch["attention_mask"]
    expected = positions_hfext.build_position_ids(ids == model.config.image_token_id, grids, layout, attention_mask)
    with HostSyncDetector(raise_on_sync=False) as detector:
        positions = model.model.get_position_ids(ids, grids, attention_mask)  # markers checked, then built
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    assert [what for what, where in detector.events_in("positions_hfext.py")] == [CHECK_FLAG_READ] * 2
    assert len(detector.events) == 2
    assert torch.equal(positions, expected.float())
    assert cos.shape == (3, ids.shape[1], model.config.head_dim)


def test_position_building_from_host_grids_reads_only_its_check_flag():
    mask = torch.tensor([[False, False, True, True, True, True, True, True, False], [False] * 3 + [True] * 6])
    grids = [[(2, 3)], [(1, 3), (3, 1)]]  # host data: turned into a tensor on the mask's device
    with HostSyncDetector(raise_on_sync=False) as detector:
        positions = positions_hfext.build_position_ids(mask, grids, "rope_tie_v2")
    assert [what for what, where in detector.events] == [CHECK_FLAG_READ]
    assert positions[:, 0].tolist() == positions_hfext.segment_positions([2, (2, 3), 1], "rope_tie_v2").tolist()


def test_a_forward_reads_nothing_back_for_its_positions():
    """The whole forward: whatever else syncs (transformers' own mask code), nothing in the position code does except
    the two flags of the checks (marker pairs and grids)."""
    model, batch = _image_model_and_batch("rope_tie_v2")
    with HostSyncDetector(raise_on_sync=False) as detector:
        model(**batch)
    reads = [what for what, where in detector.events_in("positions_hfext.py")]
    assert reads == [CHECK_FLAG_READ] * 2


def test_image_patches_are_inserted_with_one_read_for_their_checks():
    """The patch embeddings are gathered by index (boolean indexing would read how many there are); the two input
    checks (patch counts against the grids and against pixel_values) share one flag."""
    model, batch = _image_model_and_batch("rope_tie_v2")
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    embeds = model.model.embed_tokens(ids)
    is_patch = ids == model.config.image_token_id
    used = torch.arange(pixels.shape[1]) < is_patch.sum(dim=1)[:, None]  # each row's patches, then padding
    expected = embeds.masked_scatter(is_patch[..., None].expand_as(embeds), model.model.patch_embed(pixels[used]))
    with HostSyncDetector(raise_on_sync=False) as detector:
        inserted = model.model._insert_image_patches(batch["input_ids"], embeds, batch["pixel_values"],
                                                     batch["image_grid_hw"])
    assert [what for what, where in detector.events] == [CHECK_FLAG_READ]
    torch.testing.assert_close(inserted, expected, rtol=0, atol=1e-6)


def test_patch_counts_that_disagree_with_the_grids_or_the_pixels_are_refused():
    model, batch = _image_model_and_batch("rope_tie_v2")
    ids, pixels, grids = batch["input_ids"], batch["pixel_values"], batch["image_grid_hw"]
    embeds = model.model.embed_tokens(ids)
    wrong_grids = grids.clone()
    wrong_grids[0, 0] = torch.tensor([2, 2])  # the row's image has 4 × 6 patch tokens
    with pytest.raises(ValueError, match="image_grid_hw covers .* patches per row but input_ids hold"):
        model.model._insert_image_patches(ids, embeds, pixels, wrong_grids)
    with pytest.raises(ValueError, match="image patch tokens per row but pixel_values has 5 patches per row"):
        model.model._insert_image_patches(ids, embeds, pixels[:, :5], grids)


# ---- (b) scheduler loops ------------------------------------------------------------------------------------------
UDM_SCHEDULERS = {
    "ddpm": lambda: UDMScheduler.from_config(DDPMScheduler().config),
    "ddpm_learned_range": lambda: UDMScheduler.from_config(DDPMScheduler(variance_type="learned_range").config),
    "ddim": lambda: UDMScheduler.from_config(DDIMScheduler().config),
    "ddim_thresholding_trailing": lambda: UDMScheduler.from_config(DDIMScheduler(
        thresholding=True, timestep_spacing="trailing").config),
    "probability_flow_heun": lambda: UDMScheduler(eta=0.0, solver="heun"),
    "probability_flow_continuous": lambda: UDMScheduler(eta=0.0, time_type="continuous"),
    "eta_half_v_prediction": lambda: UDMScheduler(eta=0.5, prediction_type="v_prediction"),
    "rectified_flow": lambda: UDMScheduler(beta_schedule="rectified_flow", prediction_type="flow_prediction"),
}


def _fake_model(sample, timestep, channels=None):
    """A model output computed on the device from the sample and the tensor timestep, never read back."""
    output = 0.3 * sample + 1e-4 * timestep.float()
    return output if channels is None else torch.cat([output, output.tanh()], dim=1)[:, :channels]


def _udm_loop(scheduler, eta=None):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    learned = scheduler.config.variance_type in ("learned", "learned_range")
    extra = {} if eta is None else {"eta": eta}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        output = _fake_model(model_input, t, channels=6 if learned else None)
        sample = scheduler.step(output, t, sample, generator=generator, **extra).prev_sample
    return sample


@pytest.mark.parametrize("name", UDM_SCHEDULERS)
def test_udm_sampling_loops_make_no_host_sync(name):
    reference = UDM_SCHEDULERS[name]()
    reference.set_timesteps(6)
    expected = _udm_loop(reference)
    scheduler = UDM_SCHEDULERS[name]()
    scheduler.set_timesteps(6)  # the step coefficients are computed here, on the host
    with HostSyncDetector():
        samples = _udm_loop(scheduler)
    assert torch.equal(samples, expected)


def test_udm_with_a_per_call_eta_makes_no_host_sync():
    """DDIM pipelines pass their η to every step; the coefficients of an η other than the configured one are computed
    on the host in its first step (host data: they read no device tensor, which the detector cannot tell apart)."""
    scheduler = UDMScheduler.from_config(DDIMScheduler().config)
    scheduler.set_timesteps(6)
    expected = _udm_loop(scheduler, eta=0.5)
    with HostSyncDetector():
        samples = _udm_loop(scheduler, eta=0.5)
    assert torch.equal(samples, expected)


def test_a_timestep_that_is_not_an_element_of_timesteps_is_read():
    """The documented exception: a tensor that is not one of `scheduler.timesteps`' elements (here a copy) has to be
    read to be found in the schedule; on a GPU that waits for the device, as DDPM/DDIM do on every step."""
    scheduler = UDMScheduler.from_config(DDPMScheduler().config)
    scheduler.set_timesteps(4)
    sample = torch.zeros(1, 3, 2, 2)
    t = scheduler.timesteps[0].clone()
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), HostSyncDetector():
        scheduler.step(sample, t, sample)


REFLOW_SCHEDULERS = {
    "euler": lambda: ReFlowScheduler(),
    "heun": lambda: ReFlowScheduler(solver="heun", shift=3.0),
    "stochastic": lambda: ReFlowScheduler(stochastic_sampling=True),
    "sample_prediction": lambda: ReFlowScheduler(prediction_type="sample", timestep_spacing="trailing"),
    "from_flow_match_euler": lambda: ReFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config),
}


def _reflow_loop(scheduler):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    for t in scheduler.timesteps:
        output = _fake_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(output, t, sample, generator=generator, return_dict=False)[0]
    return sample


@pytest.mark.parametrize("name", REFLOW_SCHEDULERS)
def test_reflow_sampling_loops_make_no_host_sync(name):
    reference = REFLOW_SCHEDULERS[name]()
    reference.set_timesteps(5)
    expected = _reflow_loop(reference)
    scheduler = REFLOW_SCHEDULERS[name]()
    scheduler.set_timesteps(5)
    with HostSyncDetector():
        samples = _reflow_loop(scheduler)
    assert torch.equal(samples, expected)


def test_a_loop_entered_mid_schedule_finds_its_place_without_a_host_sync():
    by_value, by_element = ReFlowScheduler(solver="heun"), ReFlowScheduler(solver="heun")
    by_value.set_timesteps(4)
    by_element.set_timesteps(4)
    sample = torch.zeros(1, 2)
    by_value.step(sample, by_element.timesteps[3].item(), sample)
    with HostSyncDetector():
        by_element.step(sample, by_element.timesteps[3], sample)
    assert by_element.step_index == by_value.step_index == 5  # a Heun timestep is entered at its second listing


@pytest.mark.parametrize("name", ["ddpm", "probability_flow_continuous", "rectified_flow"])
def test_udm_add_noise_and_get_velocity_make_no_host_sync(name, queued_checks):
    scheduler = UDM_SCHEDULERS[name]()
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    timesteps = torch.tensor([0, 10, 500, 998])
    if name == "probability_flow_continuous":
        timesteps = timesteps + 0.25
    with HostSyncDetector():
        noisy = scheduler.add_noise(x0, noise, timesteps)
        velocity = scheduler.get_velocity(x0, noise, timesteps)
    assert noisy.shape == velocity.shape == x0.shape
    with pytest.raises(RuntimeError, match="out of range"):
        scheduler.add_noise(x0, noise, timesteps + 1000)


def test_reflow_scale_noise_makes_no_host_sync_in_training_and_img2img(queued_checks):
    scheduler = ReFlowScheduler()
    data, noise = torch.randn(4, 2), torch.randn(4, 2)
    with HostSyncDetector():
        noisy = scheduler.scale_noise(data, torch.tensor([0.0, 250.0, 500.0, 1000.0]), noise)
    torch.testing.assert_close(noisy[1], 0.25 * noise[1] + 0.75 * data[1])
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(3)  # an img2img pipeline starting part-way
    with HostSyncDetector():
        start = scheduler.scale_noise(data, scheduler.timesteps[3:4], noise)
    sigma = scheduler.sigmas[3]
    assert torch.equal(start, sigma * noise + (1 - sigma) * data)
    with pytest.raises(RuntimeError, match="out of range"):
        ReFlowScheduler().scale_noise(data, torch.tensor([1500.0]), noise)


# ---- (c) a reflow training step -----------------------------------------------------------------------------------
class _Velocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def forward(self, sample, timestep):
        return self.net(torch.cat([sample, timestep[:, None] / 1000], dim=1))


@pytest.mark.parametrize("trainer", ["rectified_flow", "reflow", "distill"])
def test_a_training_step_reads_only_its_loss(trainer):
    """Each step reads its loss once (logged, and checked to be finite before the update); nothing else in hf_ext's
    step waits for the device. (torch's AdamW reads its step counter, a CPU tensor in GPU runs too.)"""
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(32, 2, generator=generator)
    pairs = ReflowPairs(torch.randn(32, 2, generator=generator), data)
    args = FlowTrainingArguments(max_steps=2, batch_size=8, show_progress=False)
    torch.manual_seed(0)
    model = _Velocity()
    with HostSyncDetector(raise_on_sync=False) as detector:
        if trainer == "rectified_flow":
            train_rectified_flow(model, data, args)
        elif trainer == "reflow":
            train_reflow(model, pairs, args)
        else:
            distill(model, pairs, args, num_steps=2)
    ours = detector.events_in("/hf_ext/")
    assert [what for what, _ in ours] == ["Tensor.tolist(): copies values to the host"] * 2, ours
    assert all("training.py" in where and "(_train)" in where for _, where in ours)
