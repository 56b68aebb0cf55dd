"""The 2-D Gaussian-mixture toy of DMD Fig. 3, trained through the real `DMDTrainer` on CPU.

The real denoiser is the exact posterior mean of the mixture; the generator and the fake score are
small MLPs under the same contract D(x_t, t, cond) -> x0. Both runs start from the same generator, a
narrow blob nearest to one mode (Fig. 3, left):

- distribution matching + regression (Fig. 3c) spreads it over every mode with the right mass;
- the real score alone (Fig. 3a) pulls every sample into the closest mode.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch import nn

from dmd_core.config import DistillConfig
from dmd_core.samplers import ddim_sample
from dmd_core.schedules import NoiseSchedule, VPSchedule, timestep_grid
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer

GRID, SPACING, MODE_STD = 3, 2.0, 0.05
SEED = 0
N_EVAL = 4096


def mode_centers(grid: int = GRID, spacing: float = SPACING) -> torch.Tensor:
    """grid x grid equal-weight modes on a square lattice centred at 0, (grid^2, 2)."""
    axis = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


class GMMDenoiser:
    """Exact E[x | x_t] for x ~ sum_k w_k N(m_k, s^2 I) and x_t = alpha_t x + sigma_t eps.

    x_t | k ~ N(alpha_t m_k, (alpha_t^2 s^2 + sigma_t^2) I) gives the responsibilities; within a component
    E[x | x_t, k] = m_k + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (x_t - alpha_t m_k).
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseSchedule) -> None:
        self.means, self.std, self.schedule = means, std, schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x_t.double()
        alpha_t, sigma_t = self.schedule.alpha_t(t, x), self.schedule.sigma_t(t, x)   # (B, 1)
        var = alpha_t**2 * self.std**2 + sigma_t**2
        diff = x[:, None, :] - alpha_t[:, None] * self.means.double()[None]          # (B, K, 2)
        resp = torch.softmax(-0.5 * (diff**2).sum(-1) / var, dim=1)                  # equal weights
        comp = self.means.double()[None] + (alpha_t * self.std**2 / var)[:, None] * diff
        return (resp[..., None] * comp).sum(1).to(x_t.dtype)


class MLPDenoiser(nn.Module):
    """Small MLP in v-parameterisation, x0 = alpha_t x_t - sigma_t v(x_t, t), with sinusoidal t/T features."""

    def __init__(self, schedule: NoiseSchedule, hidden: int = 128, n_freq: int = 6, in_scale: float = 3.0) -> None:
        super().__init__()
        self.schedule, self.in_scale = schedule, in_scale
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.net = nn.Sequential(nn.Linear(2 + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        alpha_t, sigma_t = self.schedule.alpha_t(t, x_t), self.schedule.sigma_t(t, x_t)
        phase = (t.to(x_t.dtype) / self.schedule.T)[:, None] * self.freqs
        v = self.net(torch.cat([self.in_scale * x_t, phase.sin(), phase.cos()], 1))
        return alpha_t * x_t - sigma_t * v


class NoFakeScore(nn.Module):
    """mu_fake(x_t, t) = x_t / alpha_t, i.e. s_fake = -(x_t - alpha_t mu_fake) / sigma_t^2 = 0 exactly.

    With it the DM gradient (mu_fake - mu_real) / w equals -(sigma_t^2 / alpha_t) s_real / w: the generator
    only climbs log p_real, DMD Fig. 3a. `anchor` exists because the trainer always builds an optimizer and
    backpropagates the fake denoising loss; it enters the output multiplied by 0, so it changes nothing.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x_t / self.schedule.alpha_t(t, x_t) + 0.0 * self.anchor


def blob_generator(schedule: NoiseSchedule, start: torch.Tensor, seed: int) -> MLPDenoiser:
    """The shared starting generator: G(z) ~ a narrow blob around `start` (DMD Fig. 3, left)."""
    torch.manual_seed(seed)
    g = MLPDenoiser(schedule)
    last = g.net[-1]
    t_star = torch.tensor([schedule.T - 1])
    with torch.no_grad():
                last.bias.copy_(-start / schedule.sigma_t(t_star, start[None])[0])
    return g


def mode_masses(x: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of samples whose nearest mode is k, distance of each sample to its nearest mode)."""
    dist = torch.cdist(x.double(), means.double())
    d, k = dist.min(1)
    return torch.bincount(k, minlength=means.shape[0]).double() / x.shape[0], d


def run_toy(full: bool, seed: int = SEED, steps: int = 1500, batch: int = 256, **overrides):
    """Train the toy; full=True is DM + regression with a learned fake score, False is the real score alone."""
    torch.manual_seed(seed)
    schedule = VPSchedule.linear()
    means = mode_centers()
    teacher = GMMDenoiser(means, MODE_STD, schedule)
    start = torch.tensor([0.4, 0.2])
    cfg = DistillConfig(steps=steps, batch_size=batch, lr=1e-3, lr_fake=1e-3, weight_decay=0.0, bf16=False,
                        regression="mse" if full else "none", lambda_reg=1.0, seed=seed, warmup_steps=0)
    cfg = cfg.model_copy(update=overrides)
    pairs = None
    if full:
        z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(seed + 1))
        y = ddim_sample(teacher, z, timestep_grid(schedule.T, 100), schedule)
        pairs = TensorStream({"z": z, "y": y}, batch_size=batch, seed=seed)
    torch.manual_seed(seed + 2)
    fake = MLPDenoiser(schedule) if full else NoFakeScore(schedule)
    trainer = DMDTrainer(cfg, teacher, schedule, (2,), pairs=pairs, generator_init=blob_generator(schedule, start, seed),
                         fake_init=fake, num_classes=0)
    for _ in range(steps):
        trainer.train_step()
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        x = trainer.G(z)
    return x, means, trainer
