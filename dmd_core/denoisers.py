"""The denoiser contract D(x_s, s, cond) -> x0 (mean prediction, DMD §3.1) at a level s of a `NoiseProcess`."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Union

import torch
from torch import nn

from .backbones import backbone_for
from .parametrisations import PARAMETRISATIONS, parametrisation
from .processes import NoiseProcess, full_level

PREDICTION_TYPES = tuple(PARAMETRISATIONS)

# A condition passes through samplers, losses and generators untouched (k-diffusion's `extra_args`):
# None, a tensor (class ids for UNet2DModel) or a dict of tensors passed as keyword arguments to the
# network (`encoder_hidden_states` for Stable Diffusion; SDXL's `added_cond_kwargs` nests one more dict).
Cond = Union[None, torch.Tensor, dict[str, Any]]


class Denoiser(Protocol):
    """Anything called as D(x_s, s, cond) with levels s (B,) that returns the x0 (mean) prediction."""

    def __call__(self, x_t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor: ...


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


class NetDenoiser(nn.Module):
    """D(x_s, s, cond) -> x0 = Parametrisation.to_x0(backbone(net, x_s, c_noise(s), cond), x_s, alpha, sigma)
    (EDM's preconditioning; DMD App. H): any network a `Backbone` adapts, over a `NoiseProcess`."""

    def __init__(self, net: nn.Module, process: NoiseProcess, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.parametrisation = parametrisation(prediction_type)
        self.net = net
        self.backbone = backbone_for(net)
        self.process = process
        self.prediction_type = prediction_type
        self._register_load_state_dict_pre_hook(_legacy_keys)

    def raw(self, x_t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """The network output in its own parametrisation."""
        s = full_level(s, x_t)
        return self.backbone(self.net, x_t, self.process.c_noise(s), cond)

    def forward(self, x_t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        s = full_level(s, x_t)
        out = self.raw(x_t, s, cond).to(x_t.dtype)
        return self.parametrisation.to_x0(out, x_t, self.process.alpha(s, x_t), self.process.sigma(s, x_t))


def _legacy_keys(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the backbone redesign name the network `unet.`; it is `net.` now."""
    for key in [k for k in state_dict if k.startswith(prefix + "unet.")]:
        state_dict[prefix + "net." + key[len(prefix) + 5:]] = state_dict.pop(key)


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

    def forward(self, x_t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        if cond is None or (isinstance(self.w, float) and self.w == 1.0):
            return self.denoiser(x_t, s, cond)
        if self.null_cond is None:
            raise ValueError("classifier-free guidance needs the teacher's null condition")
        null = cond_expand(self.null_cond, x_t.shape[0], cond)
        s = full_level(s, x_t)
        x0 = self.denoiser(torch.cat([x_t, x_t]), torch.cat([s, s]), cond_cat(null, cond))
        x0_uncond, x0_cond = x0.chunk(2)
        return x0_uncond + self._scale(x0_cond) * (x0_cond - x0_uncond)


def with_guidance(denoiser: Callable, w: float, null_cond) -> Callable:
    """Return `denoiser` wrapped in CFG when w != 1, else unchanged."""
    return denoiser if w == 1.0 else CFGDenoiser(denoiser, w, null_cond)
