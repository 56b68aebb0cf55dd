"""Deterministic ODE samplers as pure functions of (denoiser, z, timesteps, schedule, cond)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .schedules import NoiseSchedule, full_t


def _check_grid(timesteps: Sequence[int], schedule: NoiseSchedule) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.T or ts[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing within [0, {schedule.T}), got {ts}")
    return ts


@torch.no_grad()
def ddim_sample(denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12): x_s = alpha_s x0 + sigma_s eps_hat; ends at x0."""
    ts = _check_grid(timesteps, schedule)
    x = z * schedule.init_noise_sigma
    x0 = x
    for i, t in enumerate(ts):
        x0 = denoiser(x, full_t(t, x), cond)
        if i + 1 == len(ts):
            break
        eps_hat = (x - schedule.alpha_t(full_t(t, x), x) * x0) / schedule.sigma_t(full_t(t, x), x)
        s = full_t(ts[i + 1], x)
        x = schedule.alpha_t(s, x) * x0 + schedule.sigma_t(s, x) * eps_hat
    return x0


def _edm_ode(denoiser: Callable, z: torch.Tensor, ts: list[int], schedule: NoiseSchedule,
             cond: Optional[torch.Tensor], heun: bool) -> torch.Tensor:
    """EDM Alg. 1 (S_churn = 0) in the scaled variables x~ = x/alpha_t, sigma~ = sigma_t/alpha_t."""
    x = z * schedule.init_noise_sigma
    alpha0 = schedule.alpha_t(full_t(ts[0], x), x)
    x_tilde = x / alpha0

    def d(x_tilde: torch.Tensor, t: int) -> torch.Tensor:
        """dx~/dsigma~ = (x~ - D(x)) / sigma~."""
        tt = full_t(t, x_tilde)
        alpha, sigma = schedule.alpha_t(tt, x_tilde), schedule.sigma_t(tt, x_tilde)
        return (x_tilde - denoiser(alpha * x_tilde, tt, cond)) / (sigma / alpha)

    def sigma_tilde(t: Optional[int]) -> torch.Tensor:
        if t is None:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return (schedule.sigmas[t] / schedule.alphas[t]).to(x.dtype).to(x.device)

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
def euler_sample(denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
                 cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (EDM Alg. 1 without the 2nd-order correction)."""
    return _edm_ode(denoiser, z, _check_grid(timesteps, schedule), schedule, cond, heun=False)


@torch.no_grad()
def heun_sample(denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Heun's 2nd-order sampler, EDM Alg. 1 with S_churn = 0."""
    return _edm_ode(denoiser, z, _check_grid(timesteps, schedule), schedule, cond, heun=True)


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
def pndm_sample(denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule,
                cond: Optional[torch.Tensor] = None, set_alpha_to_one: bool = False) -> torch.Tensor:
    """PLMS / PNDM with skip_prk_steps (Liu et al. 2022 Alg. 2; diffusers `PNDMScheduler.step_plms`).

    `timesteps` are the distinct decreasing noise levels the ODE passes through, e.g. `pndm_grid(1000, 50, 1)`
    = [981, 961, ..., 1]; step i goes ts[i] -> ts[i+1] and the last goes ts[-1] -> the end, whose alpha^2 is
    diffusers' `final_alpha_cumprod`: 1 (sigma = 0) if `set_alpha_to_one`, else the schedule's t = 0.
    The first interval is a pseudo improved-Euler step (one extra evaluation, diffusers' repeated timestep);
    the rest use the 2nd/3rd/4th-order eps history. Returns the sample at the end, diffusers' last
    `prev_sample` (what SD pipelines decode): the clean x0 estimate when `set_alpha_to_one`, else x at t = 0.
    """
    ts = _check_grid(timesteps, schedule)
    x = z * schedule.init_noise_sigma

    def coeffs(t: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if t is None and set_alpha_to_one:
            return torch.ones((), dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
        tt = full_t(0 if t is None else t, x)
        return schedule.alpha_t(tt, x), schedule.sigma_t(tt, x)

    def eps_hat(x_t: torch.Tensor, t: int) -> torch.Tensor:
        alpha_t, sigma_t = coeffs(t)
        return (x_t - alpha_t * denoiser(x_t, full_t(t, x_t), cond)) / sigma_t

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


def sample(solver: str, denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int],
           schedule: NoiseSchedule, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch to a sampler by name."""
    if solver not in SAMPLERS:
        raise ValueError(f"solver must be one of {sorted(SAMPLERS)}, got {solver!r}")
    return SAMPLERS[solver](denoiser, z, timesteps, schedule, cond)
