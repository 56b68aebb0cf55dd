"""The denoiser contract D(x_t, t, cond) -> x0 (mean prediction, DMD §3.1) and its adapters."""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import nn

from .schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Denoiser(Protocol):
    """Anything called as D(x_t, t, cond) that returns the x0 (mean) prediction."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor: ...


def x0_from_eps(x_t, eps, alpha_t, sigma_t):
    """mu = (x_t - sigma_t * eps) / alpha_t (DMD App. H)."""
    return (x_t - sigma_t * eps) / alpha_t


def eps_from_x0(x_t, x0, alpha_t, sigma_t):
    """eps = (x_t - alpha_t * x0) / sigma_t."""
    return (x_t - alpha_t * x0) / sigma_t


def x0_from_v(x_t, v, alpha_t, sigma_t):
    """x0 = alpha_t x_t - sigma_t v for VP with alpha^2 + sigma^2 = 1 (Salimans & Ho 2022)."""
    return alpha_t * x_t - sigma_t * v


def v_from_x0(x_t, x0, alpha_t, sigma_t):
    """v = alpha_t eps - sigma_t x0 = (alpha_t x_t - x0) / sigma_t for VP."""
    return (alpha_t * x_t - x0) / sigma_t


def to_x0(output, x_t, alpha_t, sigma_t, prediction_type: str):
    """Convert a network output of `prediction_type` into the x0 prediction."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, output, alpha_t, sigma_t)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, output, alpha_t, sigma_t)
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class UNetDenoiser(nn.Module):
    """Wraps a diffusers `UNet2DModel` (unconditional or class-conditional) as D(x_t, t, cond) -> x0."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network output in its own parameterisation."""
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        if cond is None:
            return self.unet(x_t, t).sample
        return self.unet(x_t, t, class_labels=cond).sample

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.raw(x_t, t, cond).to(x_t.dtype)
        alpha_t, sigma_t = self.schedule.alpha_t(t, x_t), self.schedule.sigma_t(t, x_t)
        return to_x0(out, x_t, alpha_t, sigma_t, self.prediction_type)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance x0 = x0_uncond + w (x0_cond - x0_uncond) (Ho & Salimans; DMD §3.4)."""

    def __init__(self, denoiser: Callable, w: float, null_cond: torch.Tensor | int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.w = float(w)
        self.null_cond = null_cond

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is None or self.w == 1.0:
            return self.denoiser(x_t, t, cond)
        null = torch.as_tensor(self.null_cond, device=cond.device, dtype=cond.dtype).expand_as(cond)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        x0 = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, cond]))
        x0_uncond, x0_cond = x0.chunk(2)
        return x0_uncond + self.w * (x0_cond - x0_uncond)


def with_guidance(denoiser: Callable, w: float, null_cond) -> Callable:
    """Return `denoiser` wrapped in CFG when w != 1, else unchanged."""
    return denoiser if w == 1.0 else CFGDenoiser(denoiser, w, null_cond)
