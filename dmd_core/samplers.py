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


SAMPLERS = {"ddim": ddim_sample, "euler": euler_sample, "heun": heun_sample}


def sample(solver: str, denoiser: Callable, z: torch.Tensor, timesteps: Sequence[int],
           schedule: NoiseSchedule, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch to a sampler by name."""
    if solver not in SAMPLERS:
        raise ValueError(f"solver must be one of {sorted(SAMPLERS)}, got {solver!r}")
    return SAMPLERS[solver](denoiser, z, timesteps, schedule, cond)
