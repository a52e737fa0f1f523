"""Tiny offline diffusers pieces shared by the scheduler and reflow tests."""

import os
import subprocess
import sys
import textwrap

import torch
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def tiny_unet(seed: int = 0, channels: int = 3, size: int = 8) -> UNet2DModel:
    """A 42k-parameter UNet2DModel (random weights) that runs in milliseconds on CPU."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


@torch.no_grad()
def sampling_loop(unet, scheduler, num_inference_steps=None, shape=(2, 3, 8, 8), seed=1, set_timesteps=None, **step_kwargs):
    """DDIMPipeline's loop (noise from the generator, then unet + scheduler.step per timestep), usable with any
    scheduler: DDIMPipeline itself converts whatever scheduler it is given into a DDIMScheduler."""
    generator = torch.Generator().manual_seed(seed)
    sample = randn_tensor(shape, generator=generator)
    if set_timesteps is None:
        set_timesteps = {"num_inference_steps": num_inference_steps}
    scheduler.set_timesteps(**set_timesteps)
    for t in scheduler.timesteps:
        model_output = unet(sample, t).sample
        sample = scheduler.step(model_output, t, sample, generator=generator, **step_kwargs).prev_sample
    return sample


def reload_pipeline_in_fresh_python(pipeline, folder, num_inference_steps: int) -> tuple[str, dict, object]:
    """Save ``pipeline``, load it in a new interpreter with ``import hf_ext`` + ``DiffusionPipeline.from_pretrained``
    and sample there. Returns (scheduler class name, its config, images); the caller compares with its own images
    from ``pipeline(batch_size=1, num_inference_steps, generator=manual_seed(0), output_type="np")``."""
    import json

    import numpy

    pipeline.save_pretrained(folder)
    output = run_in_fresh_python(f"""
        import json, numpy, torch
        import hf_ext
        from diffusers import DiffusionPipeline
        pipeline = DiffusionPipeline.from_pretrained({str(folder)!r})
        images = pipeline(batch_size=1, num_inference_steps={num_inference_steps},
                          generator=torch.Generator().manual_seed(0), output_type="np").images
        numpy.save({str(folder / "images.npy")!r}, images)
        print(type(pipeline.scheduler).__name__, json.dumps(dict(pipeline.scheduler.config)))
    """)
    name, config = output.strip().splitlines()[-1].split(" ", 1)
    return name, json.loads(config), numpy.load(folder / "images.npy")


def run_in_fresh_python(code: str) -> str:
    """Run `code` in a new interpreter (nothing imported yet) and return its stdout; fail with its stderr."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
