"""Deterministic ODE samplers as pure functions of (denoiser, z, levels, process, cond)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .processes import NoiseProcess, check_levels, full_level


@torch.no_grad()
def ddim_sample(denoiser: Callable, z: torch.Tensor, levels: Sequence[float], process: NoiseProcess,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12): x_s = alpha_s x0 + sigma_s eps_hat; ends at x0."""
    ts = check_levels(levels)
    x = z * process.init_noise_sigma
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoiser(x, full_level(t, x), cond)
        if i + 1 == len(ts):
            break
        eps_hat = (x - process.alpha(full_level(t, x), x) * x0) / process.sigma(full_level(t, x), x)
        s = full_level(ts[i + 1], x)
        x = process.alpha(s, x) * x0 + process.sigma(s, x) * eps_hat
    return x0


def _edm_ode(denoiser: Callable, z: torch.Tensor, ts: list[float], process: NoiseProcess,
             cond: Optional[torch.Tensor], heun: bool) -> torch.Tensor:
    """EDM Alg. 1 (S_churn = 0) in the scaled variables x~ = x/a_t, sigma~ = sigma_t/a_t with a = process.ode_alpha:
    alpha_t for VP processes; 1 for a rectified flow, whose Euler steps are then x += (sigma' - sigma) v
    (`FlowMatchEulerDiscreteScheduler.step`), with sigma = 1 (alpha = 0) a valid start."""
    x = z * process.init_noise_sigma
    alpha0 = process.ode_alpha(full_level(ts[0], x), x)
    x_tilde = x / alpha0

    def d(x_tilde: torch.Tensor, t: float) -> torch.Tensor:
        """dx~/dsigma~ = (x~ - D(x)) / sigma~."""
        tt = full_level(t, x_tilde)
        alpha, sigma = process.ode_alpha(tt, x_tilde), process.sigma(tt, x_tilde)
        return (x_tilde - denoiser(alpha * x_tilde, tt, cond)) / (sigma / alpha)

    def sigma_tilde(t: Optional[float]) -> torch.Tensor:
        if t is None:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        ref = torch.zeros(1, dtype=torch.float64, device=x.device)  # the ratio in float64, then x's dtype
        tt = full_level(t, ref)
        return (process.sigma(tt, ref) / process.ode_alpha(tt, ref)).reshape(()).to(x.dtype)

    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        h = sigma_tilde(t_next) - sigma_tilde(t)
        d_i = d(x_tilde, t)
        x_next = x_tilde + h * d_i
        if heun and t_next is not None:
            x_next = x_tilde + h * 0.5 * (d_i + d(x_next, t_next))
        x_tilde = x_next
    return x_tilde


@torch.no_grad()
def euler_sample(denoiser: Callable, z: torch.Tensor, levels: Sequence[float], process: NoiseProcess,
                 cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (EDM Alg. 1 without the 2nd-order correction)."""
    return _edm_ode(denoiser, z, check_levels(levels), process, cond, heun=False)


@torch.no_grad()
def heun_sample(denoiser: Callable, z: torch.Tensor, levels: Sequence[float], process: NoiseProcess,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Heun's 2nd-order sampler, EDM Alg. 1 with S_churn = 0."""
    return _edm_ode(denoiser, z, check_levels(levels), process, cond, heun=True)


def pndm_grid(T: int, steps: int, steps_offset: int = 0) -> list[int]:
    """diffusers `PNDMScheduler.set_timesteps` grid ("leading", T // steps apart), decreasing, without its repeat."""
    ratio = T // steps if steps >= 1 else 0
    if not 1 <= steps <= T or not 0 <= steps_offset < ratio:
        raise ValueError(f"need 1 <= steps <= {T} and 0 <= steps_offset < T // steps, got {steps=}, {steps_offset=}")
    return [(steps - 1 - i) * ratio + steps_offset for i in range(steps)]


def _transfer(x: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """Transfer phi, PNDM Eq. 9 (= DDIM): x_s = alpha_s (x_t - sigma_t eps) / alpha_t + sigma_s eps."""
    return alpha_s / alpha_t * (x - sigma_t * eps) + sigma_s * eps


def _plms_eps(ets: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the eps history (newest last), Liu et al. 2022 Eq. 12 and its warm-up orders."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


@torch.no_grad()
def pndm_sample(denoiser: Callable, z: torch.Tensor, levels: Sequence[float], process: NoiseProcess,
                cond: Optional[torch.Tensor] = None, set_alpha_to_one: bool = False) -> torch.Tensor:
    """PLMS / PNDM with skip_prk_steps (Liu et al. 2022 Alg. 2; diffusers `PNDMScheduler.step_plms`).

    `levels` are the distinct decreasing noise levels the ODE passes through, e.g. the levels of
    `pndm_grid(1000, 50, 1)` = [981, 961, ..., 1]; step i goes ts[i] -> ts[i+1] and the last goes ts[-1] -> the
    end, whose alpha^2 is diffusers' `final_alpha_cumprod`: 1 (sigma = 0) if `set_alpha_to_one`, else level 0's.
    The first interval is a pseudo improved-Euler step (one extra evaluation, diffusers' repeated timestep);
    the rest use the 2nd/3rd/4th-order eps history. Returns the sample at the end, diffusers' last
    `prev_sample` (what SD pipelines decode): the clean x0 estimate when `set_alpha_to_one`, else x at t = 0.
    """
    ts = check_levels(levels)
    x = z * process.init_noise_sigma

    def coeffs(t: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
        if t is None and set_alpha_to_one:
            return torch.ones((), dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
        tt = full_level(0.0 if t is None else t, x)
        return process.alpha(tt, x), process.sigma(tt, x)

    def eps_hat(x_t: torch.Tensor, t: float) -> torch.Tensor:
        alpha_t, sigma_t = coeffs(t)
        return (x_t - alpha_t * denoiser(x_t, full_level(t, x_t), cond)) / sigma_t

    ets: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else None
        eps = eps_hat(x, t)
        ets = ets[-3:] + [eps]
        eps_plms = _plms_eps(ets)
        if i == 0 and s is not None:  # improved Euler: average eps at t and at the Euler guess at s
            eps_plms = (eps_hat(_transfer(x, eps, *coeffs(t), *coeffs(s)), s) + eps) / 2
        x = _transfer(x, eps_plms, *coeffs(t), *coeffs(s))
    return x


SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample, "heun": heun_sample, "pndm": pndm_sample}


def sample(solver: str, denoiser: Callable, z: torch.Tensor, levels: Sequence[float],
           process: NoiseProcess, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch to a sampler by name."""
    if solver not in SAMPLERS:
        raise ValueError(f"solver must be one of {sorted(SAMPLERS)}, got {solver!r}")
    return SAMPLERS[solver](denoiser, z, levels, process, cond)
