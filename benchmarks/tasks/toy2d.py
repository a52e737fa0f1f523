"""Two-dimensional distributions and a small velocity network: the setting where reflow is seen at a glance."""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


def eight_gaussians(num_samples: int, radius: float = 4.0, std: float = 0.25,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A mixture of 8 equal Gaussians on a circle of ``radius``: [num_samples, 2]."""
    component = torch.randint(8, (num_samples,), generator=generator)
    angle = component.float() * (2 * math.pi / 8)
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(num_samples, 2, generator=generator)


def two_moons(num_samples: int, noise: float = 0.08, scale: float = 2.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half circles (scikit-learn's make_moons, centred and scaled): [num_samples, 2]."""
    upper = torch.rand(num_samples, generator=generator) < 0.5
    angle = torch.rand(num_samples, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * scale
    return points + noise * scale * torch.randn(num_samples, 2, generator=generator)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, as in diffusers' UNets: [batch, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class VelocityMLP(ModelMixin, ConfigMixin):
    """An MLP velocity model v(x, timestep) for vectors; a diffusers model (save_pretrained / from_pretrained)."""

    @register_to_config
    def __init__(self, sample_dim: int = 2, hidden_size: int = 256, num_layers: int = 3, time_embedding_dim: int = 64):
        super().__init__()
        if sample_dim < 1 or hidden_size < 1 or num_layers < 1 or time_embedding_dim < 2:
            raise ValueError("sample_dim, hidden_size and num_layers must be >= 1 and time_embedding_dim >= 2")
        layers, width = [], sample_dim + time_embedding_dim
        for _ in range(num_layers):
            layers += [torch.nn.Linear(width, hidden_size), torch.nn.SiLU()]
            width = hidden_size
        self.body = torch.nn.Sequential(*layers, torch.nn.Linear(width, sample_dim))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        embedding = timestep_embedding(timestep, self.config.time_embedding_dim).to(sample.dtype)
        return self.body(torch.cat([sample, embedding], dim=1))
