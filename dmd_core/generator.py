"""One-step and multi-step generators initialised from the teacher (DMD Alg. 1 line 2; DMD2 §4.3)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .processes import NoiseProcess, full_level


class Generator(nn.Module):
    """G_theta(z) = mu_base(z, t*) for one step; with several `timesteps`, DMD2's re-noising sampler.

    `denoiser` is a copy of the teacher (same architecture and weights); `timesteps` (in the process's timestep
    convention, as configs write them) is (t*,) for a one-step generator, e.g. (999, 749, 499, 249) for DMD2's
    four-step generator; it runs at their levels s_i = process.level(t_i).
    """

    def __init__(self, denoiser: nn.Module, process: NoiseProcess, timesteps: Sequence[int] = (999,)) -> None:
        super().__init__()
        ts = [int(t) for t in timesteps]
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or float(process.level(ts[0])) > 1 or ts[-1] < 0:
            top = "]" if float(process.level(process.T)) <= 1 else ")"  # a flow's t = T is pure noise, level 1
            raise ValueError(f"generator timesteps must be strictly decreasing within [0, {process.T}{top}, got {ts}")
        self.denoiser = denoiser
        self.process = process
        self.timesteps = ts
        self.levels = process.levels(ts)

    def step(self, x_t: torch.Tensor, i: int, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One generator evaluation x0 = G(x_{s_i}, s_i)."""
        return self.denoiser(x_t, full_level(self.levels[i], x_t), cond)

    def renoise(self, x0: torch.Tensor, i: int, eps: torch.Tensor) -> torch.Tensor:
        """Forward-diffuse x0 to the next generator level s_{i+1} with fresh noise (DMD2 §4.3)."""
        return self.process.add_noise(x0, eps, full_level(self.levels[i + 1], x0))

    def forward(self, z: torch.Tensor, cond: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample: x = init_noise_sigma * z, then alternate denoise / re-noise over the timesteps."""
        x = z * self.process.init_noise_sigma
        for i in range(len(self.timesteps)):
            x0 = self.step(x, i, cond)
            if i + 1 < len(self.timesteps):
                x = self.renoise(x0, i, self._randn(x0, generator))
        return x0

    def _randn(self, x0: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Re-noising eps in the layout the network's stock pipeline draws it (packed latents for Flux), so an
        export reproduces the generator from the same seed."""
        backbone = getattr(self.denoiser, "backbone", None)
        if backbone is not None:
            return backbone.randn_like(x0, generator)
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    def backward_simulate(self, z: torch.Tensor, cond: Optional[torch.Tensor], k: int,
                          generator: Optional[torch.Generator] = None,
                          noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """DMD2 backward simulation: roll G from pure noise without grad to step k, then step k with grad.
        Each re-noising's eps is `noise(x0)` when given (a data-parallel trainer draws the global batch), else
        standard normal from `generator`, as `forward` draws it."""
        x = z * self.process.init_noise_sigma
        with torch.no_grad():
            for i in range(k):
                x0 = self.step(x, i, cond)
                eps = noise(x0) if noise is not None else self._randn(x0, generator)
                x = self.renoise(x0, i, eps)
        return self.step(x, k, cond)


def one_step(denoiser: Callable, process: NoiseProcess, t_star: int) -> Generator:
    """The one-step generator conditioned at t* (DMD: T-1; DMD2 SDXL: 399)."""
    return Generator(denoiser, process, (t_star,))
