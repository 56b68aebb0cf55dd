"""Noise processes in a continuous level s in [0, 1]: x_s = alpha(s) x0 + sigma(s) eps, s = 1 the noisiest
(EDM §2; k-diffusion's continuous sigma). Samplers, losses, the generator and the trainer see only levels.

A level is a float64 tensor (B,). The network's noise input is `c_noise(s)` (EDM Table 1), separate from the
level: the DDPM index for a discrete VP teacher, 0.25 ln sigma for an EDM one. `level(t)` maps the diffusers
timestep convention (t in [0, T), in which configs write generator timesteps such as DMD2's 399) to a level.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .parametrisations import parametrisation


def _column(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values on `like`'s device and dtype, shaped to broadcast against it (B, 1, ...)."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def full_level(s: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The level s for every sample of `like`, as a (B,) float64 tensor on its device."""
    s = torch.as_tensor(s, dtype=torch.float64, device=like.device).reshape(-1)
    return s.expand(like.shape[0]) if s.numel() == 1 else s


def timestep_grid(T: int, steps: int) -> list[int]:
    """Trailing grid of `steps` timesteps from T-1 down (diffusers `timestep_spacing="trailing"`)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


def check_levels(levels: Sequence[float] | torch.Tensor) -> list[float]:
    """Levels as floats, strictly decreasing within [0, 1]."""
    ls = [float(s) for s in levels]
    if not ls or any(b >= a for a, b in zip(ls, ls[1:])) or ls[0] > 1 or ls[-1] < 0:
        raise ValueError(f"levels must be strictly decreasing within [0, 1], got {ls}")
    return ls


class NoiseProcess:
    """x_s = alpha(s) x0 + sigma(s) eps. Subclasses give `alpha`, `sigma`, `c_noise`, `level` and `timestep`."""

    name: str = "base"
    T: int = 1000  # training timesteps of the diffusers convention (t in [0, T))
    init_noise_sigma: float = 1.0  # scale of the pure-noise input at the start of sampling (diffusers')

    def alpha(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha(s) broadcast against `like` (B, ...)."""
        raise NotImplementedError

    def sigma(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma(s) broadcast against `like` (B, ...)."""
        raise NotImplementedError

    def c_noise(self, s: torch.Tensor) -> torch.Tensor:
        """The network's noise input at level s (B,)."""
        raise NotImplementedError

    def level(self, t: int | float | torch.Tensor) -> torch.Tensor:
        """The level of diffusers timestep t (a float64 tensor of t's shape)."""
        return torch.as_tensor(t, dtype=torch.float64) / (self.T - 1)

    def levels(self, timesteps: Sequence[int]) -> list[float]:
        """Levels of a list of timesteps (e.g. the generator's), checked decreasing."""
        return check_levels([float(self.level(t)) for t in timesteps])

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_s = alpha(s) x0 + sigma(s) eps (DMD Alg. 2 `forward_diffusion`)."""
        return self.alpha(s, x0) * x0 + self.sigma(s, x0) * eps

    def snr(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2."""
        return (self.alpha(s, like) / self.sigma(s, like)) ** 2

    def grid(self, steps: int) -> list[float]:
        """`steps` decreasing levels from the noisiest (the trailing timestep grid)."""
        return [float(self.level(t)) for t in timestep_grid(self.T, steps)]

    def draw_levels(self, n: int, lo: float, hi: float, generator: torch.Generator,
                    device: torch.device | str) -> torch.Tensor:
        """n training levels uniform over the timesteps in [lo T, hi T) (DMD Alg. 2-3 draw t uniformly)."""
        t = torch.randint(int(lo * self.T), int(hi * self.T), (n,), generator=generator, device=device)
        return self.level(t).to(device)

    def denoising_weight(self, s: torch.Tensor, like: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
        """The teacher's own loss weighting in x0 space (DMD Alg. 3): SNR for eps, SNR + 1 for v, 1 for x0."""
        return parametrisation(prediction_type).loss_weight(self.snr(s, like))

    def ode_alpha(self, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The scale a sampler divides out before stepping the probability-flow ODE, dy/dtau = (y - D) / tau with
        y = x / ode_alpha, tau = sigma / ode_alpha: alpha for a VP process (EDM Alg. 1's scaled variables)."""
        return self.alpha(s, like)


class TableProcess(NoiseProcess):
    """A process given by alpha and sigma tables over T timesteps; a level reads the nearest entry (a discrete
    process, like k-diffusion's quantised `DiscreteSchedule`): s = t / (T - 1) reads entry t exactly."""

    def __init__(self, alphas: torch.Tensor, sigmas: torch.Tensor, init_noise_sigma: float = 1.0) -> None:
        if alphas.shape != sigmas.shape or alphas.ndim != 1:
            raise ValueError("alphas and sigmas must be 1-D tensors of equal length")
        self.alphas, self.sigmas = alphas.double(), sigmas.double()
        self.T = int(alphas.numel())
        self.init_noise_sigma = float(init_noise_sigma)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (alphas, sigmas) per device

    def index(self, s: torch.Tensor) -> torch.Tensor:
        """The table entry of level s: round(s (T - 1))."""
        return torch.round(torch.as_tensor(s, dtype=torch.float64) * (self.T - 1)).long()

    def _gather(self, which: int, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Entry `index(s)` of the alpha (0) or sigma (1) table, read on s's device (no host round trip)."""
        s = torch.as_tensor(s, dtype=torch.float64)
        t = self.index(s).reshape(-1)
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"levels must lie in [0, 1] (a timestep t is the level process.level(t)); got entries "
                             f"{int(t.min())}..{int(t.max())} of {self.T}")
        if t.device not in self._tables:
            self._tables[t.device] = (self.alphas.to(t.device), self.sigmas.to(t.device))
        return _column(self._tables[t.device][which][t], like)

    def alpha(self, s, like):
        return self._gather(0, s, like)

    def sigma(self, s, like):
        return self._gather(1, s, like)

    def c_noise(self, s):
        """The DDPM timestep index, as the network was trained on it."""
        s = torch.as_tensor(s)
        return self.index(s).to(s.device)


class VPDiscrete(TableProcess):
    """Discrete variance-preserving process from `alphas_cumprod`: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)."""

    name = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod).double()
        super().__init__(abar.sqrt(), (1.0 - abar).sqrt())
        self.alphas_cumprod = abar

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPDiscrete":
        """Read `alphas_cumprod` from a diffusers scheduler (DDPM, DDIM, PNDM, ...)."""
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> "VPDiscrete":
        """DDPM linear betas (Ho et al. 2020)."""
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))


class EDM(NoiseProcess):
    """Karras et al.'s process: alpha = 1, sigma(s) = (sigma_min^(1/rho) + s (sigma_max^(1/rho) -
    sigma_min^(1/rho)))^rho, continuous in s; `bins` timesteps place the training draws and the grids
    (DMD App. B.1: 0.002, 80, 1000 bins); the network's noise input is c_noise = ln(sigma) / 4 (EDM Table 1)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 bins: int = 1000, sigma_data: float = 0.5) -> None:
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data
        self.T = int(bins)
        self.init_noise_sigma = float(sigma_max)

    def _sigma(self, s: torch.Tensor) -> torch.Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + torch.as_tensor(s, dtype=torch.float64) * (hi - lo)) ** self.rho

    def alpha(self, s, like):
        return torch.ones_like(_column(torch.as_tensor(s, dtype=torch.float64).reshape(-1), like))

    def sigma(self, s, like):
        return _column(self._sigma(s).reshape(-1), like)

    def c_noise(self, s):
        return (0.25 * torch.log(self._sigma(s))).float()

    def denoising_weight(self, s, like, prediction_type: str = "epsilon"):
        """EDM weighting SNR + 1/sigma_data^2 (DMD Alg. 3), whatever the network's output parametrisation."""
        return self.snr(s, like) + 1.0 / self.sigma_data**2


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shifting sigma = shift u / (1 + (shift - 1) u) (SD3 Eq. 23; diffusers' static `shift`, and its
    exponential dynamic shift with shift = exp(mu))."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of `shift_sigmas`: u = sigma / (shift - (shift - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """mu of resolution-dependent shifting, linear in the image token count (diffusers' `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class RectifiedFlow(NoiseProcess):
    """Rectified flow x_s = (1 - sigma) x0 + sigma eps (SD3 Eq. 1-2): alpha = 1 - sigma, and sigma(s) is the level
    s shifted toward noise, shift_sigmas(s, shift). sigma = 1 (pure noise, alpha = 0) is a valid level; nothing
    divides by alpha. The network's time input is c_noise = time_scale sigma: 1000 sigma for SD3's transformer,
    sigma for Flux's (FluxTransformer2DModel multiplies by 1000 itself). A timestep t names sigma = t / T, as
    `FlowMatchEulerDiscreteScheduler`'s timesteps (1000 sigma) do; `dynamic` marks a resolution-dependent shift
    (then shift = exp(mu)), which changes where diffusers' grids end."""

    name = "flow"

    def __init__(self, shift: float = 1.0, T: int = 1000, time_scale: float = 1000.0, dynamic: bool = False,
                 flux_grid: bool = False) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift, self.T, self.time_scale, self.dynamic = float(shift), int(T), float(time_scale), bool(dynamic)
        self.flux_grid = bool(flux_grid)
        self.init_noise_sigma = 1.0

    @classmethod
    def from_scheduler_config(cls, config: dict, image_seq_len: int | None = None, time_scale: float = 1000.0,
                              flux_grid: bool = False) -> "RectifiedFlow":
        """The process of a `FlowMatchEulerDiscreteScheduler` config: its static `shift`, or with
        `use_dynamic_shifting` the shift exp(mu) (or mu, for `time_shift_type: linear`) at `image_seq_len` tokens."""
        T = int(config.get("num_train_timesteps", 1000))
        if not config.get("use_dynamic_shifting", False):
            return cls(float(config.get("shift", 1.0)), T, time_scale, flux_grid=flux_grid)
        if image_seq_len is None:
            raise ValueError("a dynamically shifted scheduler needs the image sequence length")
        mu = flux_mu(image_seq_len, int(config.get("base_image_seq_len", 256)),
                     int(config.get("max_image_seq_len", 4096)), float(config.get("base_shift", 0.5)),
                     float(config.get("max_shift", 1.15)))
        linear = config.get("time_shift_type", "exponential") == "linear"
        return cls(mu if linear else math.exp(mu), T, time_scale, dynamic=True, flux_grid=flux_grid)

    def _sigma(self, s) -> torch.Tensor:
        return shift_sigmas(torch.as_tensor(s, dtype=torch.float64), self.shift)

    def level(self, t):
        """The level whose sigma is t / T: diffusers' flow timesteps are the shifted sigma x T, so configs name a
        flow student's steps as its pipeline would (DMD2-style [1000, 750, 500, 250]: sigma 1, 0.75, 0.5, 0.25)."""
        return unshift_sigmas(torch.as_tensor(t, dtype=torch.float64) / self.T, self.shift)

    def alpha(self, s, like):
        return _column(1.0 - self._sigma(s).reshape(-1), like)

    def sigma(self, s, like):
        return _column(self._sigma(s).reshape(-1), like)

    def c_noise(self, s):
        s = torch.as_tensor(s)
        return (self.time_scale * self._sigma(s)).float().to(s.device)

    def ode_alpha(self, s, like):
        """1: the flow ODE dx/dsigma = (x - D) / sigma = eps - x0 is stepped in x and sigma themselves."""
        return torch.ones_like(self.sigma(s, like))

    def grid(self, steps: int) -> list[float]:
        """`FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`'s levels: linspace from 1 to the training
        schedule's last level, which is shifted (1/T shifted) unless the shift is dynamic (1/T). With `flux_grid`,
        FluxPipeline's own: linspace(1, 1/steps, steps)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        import numpy as np

        if self.flux_grid:
            return [float(u) for u in np.linspace(1.0, 1.0 / steps, steps)]
        u_min = 1.0 / self.T if self.dynamic else float(shift_sigmas(torch.tensor(1.0 / self.T), self.shift))
        return [float(u) for u in np.linspace(1.0, u_min, steps)]


PROCESSES = {"vp": VPDiscrete, "edm": EDM, "flow": RectifiedFlow}
