"""The Gaussian-mixture toy of DMD Fig. 3 under rectified flow: an exact flow teacher (the mixture's analytic
velocity field, x_s = (1 - sigma) x0 + sigma eps with SD3's shift 3), flow-velocity MLPs for G and the fake score,
trained through the real `DMDTrainer` on CPU.

- distribution matching + regression on flow-Euler pairs covers every mode with the right mass;
- the real score alone (no fake score) drops modes, as in the VP toy (tests/test_gmm_toy.py).
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch import nn

from dmd_core.config import DistillConfig
from dmd_core.parametrisations import parametrisation
from dmd_core.processes import RectifiedFlow
from dmd_core.samplers import euler_sample
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer
from tests.test_gmm_toy import GRID, MODE_STD, START, GMMDenoiser, mode_centers, mode_masses, one_thread  # noqa: F401

SEED, N_PAIRS, N_EVAL, SHIFT = 0, 4096, 4096, 3.0
FLOW = parametrisation("flow_prediction")


class GMMVelocity:
    """The mixture's exact flow velocity v(x_s, s) = E[eps - x0 | x_s] = (x_s - E[x0 | x_s]) / sigma_s, as a
    denoiser through the flow-velocity parametrisation x0 = x_s - sigma_s v."""

    def __init__(self, means: torch.Tensor, std: float, process: RectifiedFlow) -> None:
        self.posterior_mean, self.process = GMMDenoiser(means, std, process), process

    def velocity(self, x_t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x_t - self.posterior_mean(x_t, s)) / self.process.sigma(s, x_t)

    def __call__(self, x_t: torch.Tensor, s: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        alpha, sigma = self.process.alpha(s, x_t), self.process.sigma(s, x_t)
        return FLOW.to_x0(self.velocity(x_t, s), x_t, alpha, sigma)


class FlowMLP(nn.Module):
    """Small MLP predicting the flow velocity with a skip, v = x_s + net(x_s, s), so x0 = x_s - sigma v =
    (1 - sigma) x_s - sigma net: at sigma = 1 the sample is -net(z), a narrow blob at random init."""

    def __init__(self, process: RectifiedFlow, hidden: int = 128, n_freq: int = 6, in_scale: float = 3.0) -> None:
        super().__init__()
        self.process, self.in_scale = process, in_scale
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.net = nn.Sequential(nn.Linear(2 + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, s: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = torch.as_tensor(s, device=x_t.device).expand(x_t.shape[0])
        phase = s.to(x_t.dtype)[:, None] * self.freqs
        v = x_t + self.net(torch.cat([self.in_scale * x_t, phase.sin(), phase.cos()], 1))
        return FLOW.to_x0(v, x_t, self.process.alpha(s, x_t), self.process.sigma(s, x_t))


class NoFakeScore(nn.Module):
    """mu_fake = x_s / alpha_s: a zero fake score, so the generator only climbs log p_real (DMD Fig. 3a)."""

    def __init__(self, process: RectifiedFlow) -> None:
        super().__init__()
        self.process = process

    def forward(self, x_t: torch.Tensor, s: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x_t / self.process.alpha(s, x_t)


def blob_generator(process: RectifiedFlow, start: torch.Tensor, seed: int) -> FlowMLP:
    """G(z) = D(z, level 1) = -net(z): its last bias puts the blob at `start`."""
    torch.manual_seed(seed)
    g = FlowMLP(process)
    with torch.no_grad():
        g.net[-1].bias.copy_(-start)
    return g


def train_flow_toy(full: bool, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """full: DM with a learned flow fake score (velocity loss, weight 1 / sigma^2) + MSE regression on flow-Euler
    pairs; else DM with `NoFakeScore` alone. Returns (EMA generator samples, mode centres)."""
    process = RectifiedFlow(shift=SHIFT)
    means = mode_centers()
    teacher = GMMVelocity(means, MODE_STD, process)
    steps = 2000 if full else 400
    cfg = DistillConfig(steps=steps, batch_size=256, lr=5e-3, lr_fake=3e-3, weight_decay=0.0, ema_decay=0.99,
                        regression="mse" if full else "none", lambda_reg=1.0, bf16=False, seed=seed,
                        generator_timesteps=[1000])
    pairs = None
    if full:
        z = torch.randn(N_PAIRS, 2, generator=torch.Generator().manual_seed(seed + 1))
        y = euler_sample(teacher, z, process.grid(100), process)
        pairs = TensorStream({"z": z, "y": y}, batch_size=cfg.batch_size, seed=seed)
    generator = blob_generator(process, torch.tensor(START), seed)
    torch.manual_seed(seed + 2)
    fake = FlowMLP(process) if full else NoFakeScore(process)
    trainer = DMDTrainer(cfg, teacher, process, (2,), pairs=pairs, generator_init=generator, fake_init=fake,
                         num_classes=0, prediction_type="flow_prediction")
    for _ in range(cfg.steps):
        trainer.train_step()
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        return trainer.ema_generator()(z), means


def test_velocity_is_the_mixtures_flow():
    """v = E[eps | x_s] - E[x0 | x_s], with E[eps | x_s] = -sigma grad log p_s(x_s) (Tweedie) from autograd of the
    diffused mixture's density and E[x0 | x_s] = (x_s - sigma E[eps | x_s]) / alpha."""
    process = RectifiedFlow(shift=SHIFT)
    teacher = GMMVelocity(mode_centers(), MODE_STD, process)
    g = torch.Generator().manual_seed(0)
    x_t = (2 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    s = torch.rand(64, generator=g, dtype=torch.float64) * 0.96 + 0.02
    (score,) = torch.autograd.grad(teacher.posterior_mean.log_density(x_t, s).sum(), x_t)
    sigma = process.sigma(s, x_t)
    eps_hat = -sigma * score
    x0_hat = (x_t.detach() - sigma * eps_hat) / process.alpha(s, x_t)
    torch.testing.assert_close(teacher.velocity(x_t.detach(), s), eps_hat - x0_hat, rtol=1e-7, atol=1e-7)


def test_generator_starts_as_one_blob():
    process, means = RectifiedFlow(shift=SHIFT), mode_centers()
    g = blob_generator(process, torch.tensor(START), SEED)
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(SEED + 3))
    with torch.no_grad():
        x = g(z, torch.full((N_EVAL,), 1.0, dtype=torch.float64))
    masses, _ = mode_masses(x, means)
    assert masses[GRID**2 // 2] == 1.0
    assert (x - torch.tensor(START)).norm(dim=1).max() < 0.5


@pytest.mark.slow
def test_flow_dm_and_regression_cover_every_mode(one_thread):
    """Every mode holds 1/9 of the mass within 5 points (measured within 1.2), samples on the modes."""
    x, means = train_flow_toy(full=True)
    masses, dist = mode_masses(x, means)
    assert torch.isfinite(x).all()
    assert (masses - 1.0 / means.shape[0]).abs().max() < 0.05, f"mode masses {masses.tolist()}"
    assert dist.median() < 0.15, f"median distance to nearest mode {dist.median():.3f}"


@pytest.mark.slow
def test_flow_real_score_alone_drops_modes(one_thread):
    """Without the fake score every sample falls into the mode nearest the start (DMD Fig. 3a)."""
    x, means = train_flow_toy(full=False)
    masses, _ = mode_masses(x, means)
    assert torch.isfinite(x).all()
    assert int(masses.argmax()) == GRID**2 // 2 and masses.max() > 0.95, f"mode masses {masses.tolist()}"
    assert int((masses >= 0.05).sum()) == 1
