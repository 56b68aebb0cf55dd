"""DMD and DMD2 losses as pure tensor functions returning per-sample values; callers reduce and weight."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .processes import NoiseProcess

DM_WEIGHTINGS = ("dmd", "sigma_over_alpha", "sigma3_over_alpha")


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def dm_gradient(x: torch.Tensor, x_t: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor,
                alpha_t: torch.Tensor, sigma_t: torch.Tensor, weighting: str = "dmd") -> torch.Tensor:
    """Distribution-matching direction on x (DMD Eq. 7-8, Alg. 2); descending it moves x toward mu_real.

    "dmd": (mu_fake - mu_real) / w with w = mean_{C,H,W} |x - mu_real| (Alg. 2);
    "sigma_over_alpha" / "sigma3_over_alpha": w_t alpha_t (s_fake - s_real) with w_t = sigma_t/alpha_t or
    sigma_t^3/alpha_t and scores s = (alpha_t mu - x_t) / sigma_t^2 (DMD Table 2 ablation).
    """
    if weighting == "dmd":
        w = (x - mu_real).abs().flatten(1).mean(1).clamp_min(1e-8).reshape(-1, *([1] * (x.ndim - 1)))
        grad = (mu_fake - mu_real) / w
    elif weighting in ("sigma_over_alpha", "sigma3_over_alpha"):
        s_real = (alpha_t * mu_real - x_t) / sigma_t**2
        s_fake = (alpha_t * mu_fake - x_t) / sigma_t**2
        w_t = sigma_t / alpha_t if weighting == "sigma_over_alpha" else sigma_t**3 / alpha_t
        grad = w_t * alpha_t * (s_fake - s_real)
    else:
        raise ValueError(f"weighting must be one of {DM_WEIGHTINGS}, got {weighting!r}")
    return torch.nan_to_num(grad)


def distribution_matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * ||x - stopgrad(x - grad)||^2 / (C H W), whose gradient is grad / numel (DMD Alg. 2)."""
    target = (x - grad).detach()
    return 0.5 * _per_sample_mean((x - target) ** 2)


def dm_loss(x: torch.Tensor, mu_real: Callable, mu_fake: Callable, process: NoiseProcess,
            s: torch.Tensor, eps: torch.Tensor, cond: Optional[torch.Tensor] = None,
            weighting: str = "dmd") -> tuple[torch.Tensor, torch.Tensor]:
    """Diffuse x to x_s at levels s, denoise with real and fake scores without grad, return (per-sample loss, grad)."""
    with torch.no_grad():
        x_t = process.add_noise(x.detach(), eps, s)
        pred_real = mu_real(x_t, s, cond)
        pred_fake = mu_fake(x_t, s, cond)
        grad = dm_gradient(x.detach(), x_t, pred_real.to(x.dtype), pred_fake.to(x.dtype),
                           process.alpha(s, x), process.sigma(s, x), weighting)
    return distribution_matching_loss(x, grad), grad


def denoising_loss(pred_x0: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample weight * mean_{C,H,W} (mu_fake(x_t, t) - stopgrad(x))^2 (DMD Alg. 3 / Eq. 6)."""
    w = weight.reshape(weight.shape[0], -1)[:, 0]
    return w * _per_sample_mean((pred_x0 - x.detach()) ** 2)


def mse_regression(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, an option for the regression loss (DMD Eq. 9)."""
    return _per_sample_mean((x - y) ** 2)


def pseudo_huber_regression(x: torch.Tensor, y: torch.Tensor, c: Optional[float] = None) -> torch.Tensor:
    """Per-sample sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023)."""
    d = x[0].numel()
    c = 0.00054 * d**0.5 if c is None else c
    return torch.sqrt(((x - y) ** 2).flatten(1).sum(1) + c**2) - c


def lpips_regression(x: torch.Tensor, y: torch.Tensor, lpips_model: Callable, size: int = 224) -> torch.Tensor:
    """Per-sample LPIPS(x, y) on inputs bilinearly upsampled to size x size (DMD Eq. 9, App. B)."""
    def prep(v: torch.Tensor) -> torch.Tensor:
        v = v.repeat(1, 3, 1, 1) if v.shape[1] == 1 else v
        return F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)

    return lpips_model(prep(x), prep(y)).reshape(x.shape[0])


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(x_fake)) per sample (DMD2 Eq. 3)."""
    return F.softplus(-logits_fake).reshape(logits_fake.shape[0], -1).mean(1)


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """R1 = ||grad_x D(x)||^2 per real sample (Mescheder et al. 2018, Eq. 9, before its gamma/2); `x_real` must
    require grad and `logits_real` depend on it. The graph is kept, so the penalty trains D."""
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return grad.reshape(grad.shape[0], -1).square().sum(1)


def approximate_r1_penalty(logits_real: torch.Tensor, logits_perturbed: torch.Tensor, sigma: float) -> torch.Tensor:
    """||D(x) - D(x + sigma eps)||^2 / sigma^2 per sample: APT's approximated R1 (Lin et al. 2025), divided by
    sigma^2 so that its expectation over eps ~ N(0, I) tends to R1's ||grad_x D(x)||^2 as sigma -> 0."""
    diff = (logits_real - logits_perturbed).reshape(logits_real.shape[0], -1)
    return diff.square().sum(1) / sigma ** 2


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss softplus(-D(x_real)) + softplus(D(x_fake)) per sample (DMD2 Eq. 3)."""
    real = F.softplus(-logits_real).reshape(logits_real.shape[0], -1).mean(1)
    fake = F.softplus(logits_fake).reshape(logits_fake.shape[0], -1).mean(1)
    return real + fake
