"""Noise schedules giving alpha_t and sigma_t on a discrete grid of T timesteps (DMD §3.1, EDM §2)."""
from __future__ import annotations

import torch

from .parametrisations import parametrisation


class NoiseSchedule:
    """Discrete schedule: x_t = alpha_t * x + sigma_t * eps for integer t in [0, T)."""

    kind: str = "base"

    def __init__(self, alphas: torch.Tensor, sigmas: torch.Tensor, init_noise_sigma: float) -> None:
        if alphas.shape != sigmas.shape or alphas.ndim != 1:
            raise ValueError("alphas and sigmas must be 1-D tensors of equal length")
        self.alphas = alphas.double()
        self.sigmas = sigmas.double()
        # Scale of the pure-noise input at the start of sampling (diffusers' `init_noise_sigma`).
        self.init_noise_sigma = float(init_noise_sigma)

    @property
    def T(self) -> int:
        return int(self.alphas.numel())

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=table.device).long().reshape(-1)
        out = table[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def alpha_t(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_t broadcast against `like` (B, ...)."""
        return self._gather(self.alphas, t, like)

    def sigma_t(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma_t broadcast against `like` (B, ...)."""
        return self._gather(self.sigmas, t, like)

    def add_noise(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion x_t = alpha_t x + sigma_t eps (DMD Alg. 2 `forward_diffusion`)."""
        return self.alpha_t(t, x) * x + self.sigma_t(t, x) * eps

    def snr(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
        return (self.alpha_t(t, like) / self.sigma_t(t, like)) ** 2

    def denoising_weight(self, t: torch.Tensor, like: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
        """The teacher's own loss weighting in x0 space (DMD Alg. 3): SNR for eps, SNR + 1 for v, 1 for x0."""
        return parametrisation(prediction_type).loss_weight(self.snr(t, like))


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule from `alphas_cumprod`: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod).double()
        super().__init__(abar.sqrt(), (1.0 - abar).sqrt(), init_noise_sigma=1.0)
        self.alphas_cumprod = abar

    @classmethod
    def from_scheduler(cls, scheduler) -> "VPSchedule":
        """Read `alphas_cumprod` from a diffusers scheduler (DDPM, DDIM, PNDM, ...)."""
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> "VPSchedule":
        """DDPM linear betas (Ho et al. 2020)."""
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))


class EDMSchedule(NoiseSchedule):
    """Karras et al. sigmas discretised into `bins` steps; alpha_t = 1 (DMD App. B.1: 0.002, 80, 1000 bins)."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 bins: int = 1000, sigma_data: float = 0.5) -> None:
        ramp = torch.linspace(0, 1, bins, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (lo + ramp * (hi - lo)) ** rho  # t = 0 is sigma_min, t = bins - 1 is sigma_max
        super().__init__(torch.ones_like(sigmas), sigmas, init_noise_sigma=sigma_max)
        self.sigma_data = sigma_data

    def denoising_weight(self, t: torch.Tensor, like: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
        """EDM weighting SNR + 1/sigma_data^2 (DMD Alg. 3), whatever the network's output parameterisation."""
        return self.snr(t, like) + 1.0 / self.sigma_data**2


def full_t(t: int, like: torch.Tensor) -> torch.Tensor:
    """The integer timestep t as a (B,) long tensor on `like`'s device."""
    return torch.full((like.shape[0],), int(t), device=like.device, dtype=torch.long)


def timestep_grid(T: int, steps: int) -> list[int]:
    """Trailing grid of `steps` timesteps from T-1 down (diffusers `timestep_spacing="trailing"`)."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]

