"""The 2-D Gaussian-mixture toy of DMD Fig. 3, trained through the real `DMDTrainer` on CPU (~20 s, one thread).

The real denoiser is the exact posterior mean of a 3 x 3 grid of equal-weight Gaussians; the generator
and the fake score are small MLPs under the same contract D(x_t, t, cond) -> x0. Both runs start from
the same generator, a narrow blob next to the central mode (Fig. 3, left):

- distribution matching + regression (Fig. 3c) spreads it over all nine modes with the right mass;
- the real score alone (Fig. 3a) pulls every sample into the closest mode.

Why the central mode: with the DMD weighting every noise level pulls with unit strength, and for
sigma_t / alpha_t above about the mode spacing the diffused mixture is one blob around its mean. Alone,
the real score therefore drags samples towards the mixture mean; on a ring of modes that is empty space
(samples pile up in the middle, on no mode), on the grid it is the central mode.
"""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch import nn

from dmd_core.config import DistillConfig
from dmd_core.samplers import ddim_sample
from dmd_core.processes import NoiseProcess, VPDiscrete
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer

GRID, SPACING, MODE_STD = 3, 2.0, 0.05
START = (0.4, 0.2)          # the starting blob, inside the central mode's cell
SEED = 0
N_PAIRS, N_EVAL = 4096, 4096


def mode_centers(grid: int = GRID, spacing: float = SPACING) -> torch.Tensor:
    """grid x grid equal-weight modes on a square lattice centred at 0, (grid^2, 2)."""
    axis = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


class GMMDenoiser:
    """Exact E[x | x_t] for x ~ (1/K) sum_k N(m_k, s^2 I) and x_t = alpha_t x + sigma_t eps.

    x_t | k ~ N(alpha_t m_k, (alpha_t^2 s^2 + sigma_t^2) I) gives the responsibilities; within a component
    E[x | x_t, k] = m_k + alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2) (x_t - alpha_t m_k).
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: NoiseProcess) -> None:
        self.means, self.std, self.schedule = means.double(), std, schedule

    def log_density(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t) of the diffused mixture, (B,)."""
        alpha_t, sigma_t = self.schedule.alpha(t, x_t), self.schedule.sigma(t, x_t)
        var = alpha_t**2 * self.std**2 + sigma_t**2                                    # (B, 1)
        sq = ((x_t[:, None, :] - alpha_t[:, None] * self.means[None]) ** 2).sum(-1)   # (B, K)
        log_n = -0.5 * sq / var - torch.log(2 * math.pi * var)
        return torch.logsumexp(log_n, 1) - math.log(self.means.shape[0])

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x_t.double()
        alpha_t, sigma_t = self.schedule.alpha(t, x), self.schedule.sigma(t, x)   # (B, 1)
        var = alpha_t**2 * self.std**2 + sigma_t**2
        diff = x[:, None, :] - alpha_t[:, None] * self.means[None]                    # (B, K, 2)
        resp = torch.softmax(-0.5 * (diff**2).sum(-1) / var, dim=1)                   # equal weights
        comp = self.means[None] + (alpha_t * self.std**2 / var)[:, None] * diff
        return (resp[..., None] * comp).sum(1).to(x_t.dtype)


class MLPDenoiser(nn.Module):
    """Small MLP in v-parameterisation, x0 = alpha_t x_t - sigma_t v(x_t, t), with sinusoidal t/T features.

    `in_scale` multiplies x_t at the input: a steeper first layer lets the small MLP form the sharp
    boundaries between modes within a few hundred steps instead of a few thousand.
    """

    def __init__(self, schedule: NoiseProcess, hidden: int = 128, n_freq: int = 6, in_scale: float = 3.0) -> None:
        super().__init__()
        self.schedule, self.in_scale = schedule, in_scale
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.net = nn.Sequential(nn.Linear(2 + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])  # the level s
        alpha_t, sigma_t = self.schedule.alpha(t, x_t), self.schedule.sigma(t, x_t)
        phase = (t.to(x_t.dtype) * (self.schedule.T - 1) / self.schedule.T)[:, None] * self.freqs
        v = self.net(torch.cat([self.in_scale * x_t, phase.sin(), phase.cos()], 1))
        return alpha_t * x_t - sigma_t * v


class NoFakeScore(nn.Module):
    """mu_fake(x_t, t) = x_t / alpha_t, i.e. s_fake = -(x_t - alpha_t mu_fake) / sigma_t^2 = 0 exactly.

    With it the DM gradient (mu_fake - mu_real) / w equals -(sigma_t^2 / alpha_t) s_real / w: the generator
    only climbs log p_real (DMD Fig. 3a). It has no parameters: the trainer then skips the fake-score update.
    """

    def __init__(self, schedule: NoiseProcess) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x_t / self.schedule.alpha(t, x_t)


def blob_generator(schedule: NoiseProcess, start: torch.Tensor, seed: int) -> MLPDenoiser:
    """The shared starting generator: G(z) = D(z, T-1) is a narrow blob around `start` (DMD Fig. 3, left)."""
    torch.manual_seed(seed)
    g = MLPDenoiser(schedule)
    t_star = torch.tensor([1.0])
    with torch.no_grad():  # x0 = alpha z - sigma v: shift v so that x0 sits at `start`
        g.net[-1].bias.copy_(-start / schedule.sigma(t_star, start[None])[0])
    return g


def mode_masses(x: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of samples whose nearest mode is k, each sample's distance to its nearest mode)."""
    d, k = torch.cdist(x.double(), means.double()).min(1)
    return torch.bincount(k, minlength=means.shape[0]).double() / x.shape[0], d


def train_toy(full: bool, seed: int = SEED, lora_rank: int = 0,
              lora_alpha: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the toy and return (EMA generator samples, mode centers).

    full=True: DM with a learned fake score + MSE regression on ODE pairs (DMD Fig. 3c).
    full=False: DM with `NoFakeScore`, no regression: the real score alone (DMD Fig. 3a).
    lora_rank > 0: the generator (and its EMA) and the fake score train LoRA adapters over their frozen MLPs.
    """
    schedule = VPDiscrete.linear()
    means = mode_centers()
    teacher = GMMDenoiser(means, MODE_STD, schedule)
    steps = 2000 if full else 400
    # Toy-scale choices: higher lr than the paper's 5e-5, lambda_reg 1 for MSE in 2-D, EMA over ~100 steps.
    cfg = DistillConfig(steps=steps, batch_size=256, lr=5e-3, lr_fake=3e-3, weight_decay=0.0, ema_decay=0.99,
                        regression="mse" if full else "none", lambda_reg=1.0, bf16=False, seed=seed,
                        lora_rank=lora_rank, lora_alpha=lora_alpha)
    pairs = None
    if full:
        z = torch.randn(N_PAIRS, 2, generator=torch.Generator().manual_seed(seed + 1))
        y = ddim_sample(teacher, z, schedule.grid(100), schedule)
        pairs = TensorStream({"z": z, "y": y}, batch_size=cfg.batch_size, seed=seed)
    generator = blob_generator(schedule, torch.tensor(START), seed)
    torch.manual_seed(seed + 2)
    fake = MLPDenoiser(schedule) if full else NoFakeScore(schedule)
    # The fake score keeps the weighting the toy was calibrated with (SNR, as for an eps-prediction teacher).
    trainer = DMDTrainer(cfg, teacher, schedule, (2,), pairs=pairs, generator_init=generator, fake_init=fake,
                         num_classes=0, prediction_type="epsilon")
    for _ in range(cfg.steps):
        trainer.train_step()
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(seed + 3))
    with torch.no_grad():
        return trainer.ema_generator()(z), means


@pytest.fixture
def one_thread():
    """Pin torch to one CPU thread and restore afterwards: these MLPs are too small to gain from more,
    and a single thread neither spin-waits on a busy machine nor varies the reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gmm_denoiser_is_tweedie_of_its_density():
    """E[x | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / alpha_t (Tweedie), checked by autograd."""
    schedule = VPDiscrete.linear()
    teacher = GMMDenoiser(mode_centers(), MODE_STD, schedule)
    g = torch.Generator().manual_seed(0)
    x_t = (3 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = schedule.level(torch.randint(0, schedule.T, (64,), generator=g))
    (score,) = torch.autograd.grad(teacher.log_density(x_t, t).sum(), x_t)
    alpha_t, sigma_t = schedule.alpha(t, x_t), schedule.sigma(t, x_t)
    expected = (x_t.detach() + sigma_t**2 * score) / alpha_t
    torch.testing.assert_close(teacher(x_t.detach(), t), expected, rtol=1e-9, atol=1e-9)


def test_both_runs_start_from_one_blob():
    """The shared starting generator puts every sample in the central mode's cell, far from the others."""
    schedule, means = VPDiscrete.linear(), mode_centers()
    g = blob_generator(schedule, torch.tensor(START), SEED)
    z = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(SEED + 3))
    with torch.no_grad():
        x = g(z, torch.full((N_EVAL,), 1.0))
    masses, _ = mode_masses(x, means)
    assert masses[GRID**2 // 2] == 1.0
    assert (x - torch.tensor(START)).norm(dim=1).max() < 0.5


@pytest.mark.slow
def test_dm_and_regression_cover_every_mode(one_thread):
    """DMD Fig. 3c: every mode holds 1/9 of the mass within 5 points, and samples sit on the modes."""
    x, means = train_toy(full=True)
    masses, dist = mode_masses(x, means)
    target = 1.0 / means.shape[0]
    assert torch.isfinite(x).all()
    assert (masses - target).abs().max() < 0.05, f"mode masses {masses.tolist()}"
    # Modes are 2 apart (the cell boundary is 1 away); true samples have median distance 0.06.
    assert dist.median() < 0.15, f"median distance to nearest mode {dist.median():.3f}"
    assert dist.quantile(0.9) < 0.5, f"90th percentile distance to nearest mode {dist.quantile(0.9):.3f}"


@pytest.mark.slow
def test_lora_students_cover_every_mode(one_thread):
    """Fig. 3c with LoRA students (r = 16, alpha = 32 on every Linear): the frozen blob generator's adapter
    still spreads it over all nine modes within 5 points, the fake score being an adapter of its own MLP."""
    x, means = train_toy(full=True, lora_rank=16, lora_alpha=32.0)
    masses, dist = mode_masses(x, means)
    assert torch.isfinite(x).all()
    assert (masses - 1.0 / means.shape[0]).abs().max() < 0.05, f"mode masses {masses.tolist()}"
    assert dist.median() < 0.15, f"median distance to nearest mode {dist.median():.3f}"


@pytest.mark.slow
def test_real_score_alone_collapses_to_one_mode(one_thread):
    """DMD Fig. 3a: without the fake score every sample falls into the mode closest to the start."""
    x, means = train_toy(full=False)
    masses, dist = mode_masses(x, means)
    assert torch.isfinite(x).all()
    assert int(masses.argmax()) == GRID**2 // 2, f"mode masses {masses.tolist()}"
    assert masses.max() > 0.95, f"mode masses {masses.tolist()}"
    assert int((masses >= 0.05).sum()) == 1
    assert dist.median() < 0.15, f"median distance to nearest mode {dist.median():.3f}"
