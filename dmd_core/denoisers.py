"""The denoiser contract D(x_t, t, cond) -> x0 (mean prediction, DMD §3.1) and its adapters."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Union

import torch
from torch import nn

from .parametrisations import PARAMETRISATIONS, parametrisation
from .schedules import NoiseSchedule

PREDICTION_TYPES = tuple(PARAMETRISATIONS)

# A condition passes through samplers, losses and generators untouched (k-diffusion's `extra_args`):
# None, a tensor (class ids for UNet2DModel) or a dict of tensors passed as keyword arguments to the
# network (`encoder_hidden_states` for Stable Diffusion; SDXL's `added_cond_kwargs` nests one more dict).
Cond = Union[None, torch.Tensor, dict[str, Any]]


class Denoiser(Protocol):
    """Anything called as D(x_t, t, cond) that returns the x0 (mean) prediction."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


def cond_map(fn: Callable[[torch.Tensor], torch.Tensor], cond: Cond) -> Cond:
    """Apply `fn` to every tensor of a condition (tensor, nested dict of tensors or None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cond_map(fn, v) for k, v in cond.items()}
    return fn(cond) if isinstance(cond, torch.Tensor) else cond


def cond_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions of the same structure along the batch dimension."""
    if a is None and b is None:
        return None
    if isinstance(a, dict):
        return {k: cond_cat(a[k], b[k]) for k in a}
    return torch.cat([a, b.to(a.device)])


def cond_expand(null: Cond, n: int, like: Cond) -> Cond:
    """The batch-1 (or scalar) null condition repeated to batch n, on `like`'s device and dtype."""
    if isinstance(null, dict):
        return {k: cond_expand(null[k], n, like[k]) for k in null}
    null = torch.as_tensor(null, device=like.device, dtype=like.dtype)
    return null.reshape(-1, *like.shape[1:])[:1].expand(n, *like.shape[1:])


def to_x0(output, x_t, alpha_t, sigma_t, prediction_type: str):
    """Convert a network output of `prediction_type` into the x0 prediction (`parametrisations`)."""
    return parametrisation(prediction_type).to_x0(output, x_t, alpha_t, sigma_t)


class UNetDenoiser(nn.Module):
    """Wraps a diffusers `UNet2DModel` (unconditional or class-conditional) as D(x_t, t, cond) -> x0."""

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The network output in its own parameterisation; a dict condition becomes keyword arguments."""
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        if cond is None:
            return self.unet(x_t, t).sample
        if isinstance(cond, dict):
            return self.unet(x_t, t, **cond).sample
        return self.unet(x_t, t, class_labels=cond).sample

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        out = self.raw(x_t, t, cond).to(x_t.dtype)
        alpha_t, sigma_t = self.schedule.alpha_t(t, x_t), self.schedule.sigma_t(t, x_t)
        return to_x0(out, x_t, alpha_t, sigma_t, self.prediction_type)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance x0 = x0_uncond + w (x0_cond - x0_uncond) (Ho & Salimans; DMD §3.4).

    `null_cond` has the structure of a condition with batch 1 (a class id, or e.g. the empty prompt's
    `{"encoder_hidden_states": (1, L, D)}`); it is repeated to the batch and run with it in one call.
    """

    def __init__(self, denoiser: Callable, w: float | torch.Tensor, null_cond: Cond | int) -> None:
        super().__init__()
        self.denoiser = denoiser
        # A tensor w of shape (B,) guides each sample at its own scale (broadcast over the sample dimensions).
        self.w = w if isinstance(w, torch.Tensor) and w.ndim > 0 else float(w)
        self.null_cond = null_cond
        self.prediction_type = getattr(denoiser, "prediction_type", None)

    def _scale(self, like: torch.Tensor) -> float | torch.Tensor:
        if isinstance(self.w, float):
            return self.w
        if self.w.shape != like.shape[:1]:
            raise ValueError(f"per-sample guidance: w has shape {tuple(self.w.shape)}, the batch is {like.shape[0]}")
        return self.w.to(like).reshape(-1, *([1] * (like.ndim - 1)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        if cond is None or (isinstance(self.w, float) and self.w == 1.0):
            return self.denoiser(x_t, t, cond)
        if self.null_cond is None:
            raise ValueError("classifier-free guidance needs the teacher's null condition")
        null = cond_expand(self.null_cond, x_t.shape[0], cond)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        x0 = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(null, cond))
        x0_uncond, x0_cond = x0.chunk(2)
        return x0_uncond + self._scale(x0_cond) * (x0_cond - x0_uncond)


def with_guidance(denoiser: Callable, w: float, null_cond) -> Callable:
    """Return `denoiser` wrapped in CFG when w != 1, else unchanged."""
    return denoiser if w == 1.0 else CFGDenoiser(denoiser, w, null_cond)
