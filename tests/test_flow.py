"""Rectified flow in the core: the process against diffusers' FlowMatchEulerDiscreteScheduler (its sigmas, its
shifts, its Euler loop), the flow-velocity parametrisation, and Heun against the closed-form flow of a Gaussian."""
import math

import numpy as np
import pytest
import torch

from dmd_core.generator import Generator
from dmd_core.parametrisations import parametrisation
from dmd_core.processes import RectifiedFlow, flux_mu, shift_sigmas, unshift_sigmas
from dmd_core.samplers import ddim_sample, euler_sample, heun_sample


class VelocityField(torch.nn.Module):
    """A fixed smooth velocity v(x, timestep) standing in for a transformer: it reads the scheduler's timestep
    (1000 sigma), as SD3's does."""

    def __init__(self, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        tau = (timestep.to(x.dtype) / 1000).reshape(-1, 1)
        return torch.tanh(x @ self.W.to(x.dtype)) * (1 + tau) + 0.3 * x - tau * self.b.to(x.dtype)


def denoiser_of(field: VelocityField, process: RectifiedFlow):
    """D(x, s) = x - sigma v(x, c_noise(s)): the flow-velocity parametrisation over the process."""
    param = parametrisation("flow_prediction")

    def D(x, s, cond=None):
        return param.to_x0(field(x, process.c_noise(s)), x, process.alpha(s, x), process.sigma(s, x))
    return D


def scheduler_loop(scheduler, field: VelocityField, z: torch.Tensor, steps: int, mu=None) -> torch.Tensor:
    """The stock sampling loop: set_timesteps, then scheduler.step with the model's velocity."""
    scheduler.set_timesteps(steps, mu=mu)
    x = z
    for t in scheduler.timesteps:
        x = scheduler.step(field(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


def test_flow_velocity_parametrisation():
    """x0 = x_t - sigma v and v = eps - x0 invert each other on x_t = (1 - sigma) x0 + sigma eps, and the loss weight
    (1 + sqrt(SNR))^2 equals 1 / sigma^2 (|v_hat - v|^2 = |x0_hat - x0|^2 / sigma^2)."""
    p = parametrisation("flow_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64)[:, None]
    x_t = (1 - sigma) * x0 + sigma * eps
    v = p.target(x0, eps, 1 - sigma, sigma)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(p.to_x0(v, x_t, 1 - sigma, sigma), x0)
    x0_hat = x0 + 0.1 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    v_hat = (x_t - x0_hat) / sigma
    snr = ((1 - sigma) / sigma) ** 2
    torch.testing.assert_close(((v_hat - v) ** 2).sum(1, keepdim=True),
                               p.loss_weight(snr) * ((x0_hat - x0) ** 2).sum(1, keepdim=True))
    torch.testing.assert_close(p.loss_weight(snr), 1 / sigma**2)
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    torch.testing.assert_close(p.loss_weight(snr).float(), compute_loss_weighting_for_sd3("sigma_sqrt", sigma))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_process_is_the_schedulers(shift):
    """sigma(level t / T) is the scheduler's training sigma at timestep index t, alpha = 1 - sigma, the network's
    time input is its `timesteps`, and sigma = 1 is pure noise with alpha = 0 exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    process = RectifiedFlow.from_scheduler_config(dict(sched.config))
    s = process.level(sched.timesteps)  # the scheduler's training timesteps, 1000 x the shifted sigmas
    torch.testing.assert_close(s, torch.arange(1000, 0, -1, dtype=torch.float64) / 1000, rtol=0, atol=1e-6)  # uniform
    like = torch.zeros(1000, 1)
    torch.testing.assert_close(process.sigma(s, like).flatten(), sched.sigmas.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(process.c_noise(s), sched.timesteps.float(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(process.alpha(s, like) + process.sigma(s, like), torch.ones_like(like))
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    top = torch.ones(4, dtype=torch.float64)
    assert torch.equal(process.add_noise(x0, eps, top), eps) and not process.alpha(top, x0).any()
    assert torch.isfinite(process.denoising_weight(top, x0, "flow_prediction")).all()


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_equals_flow_match_euler_static(steps, shift):
    """euler_sample over process.grid(steps) equals FlowMatchEulerDiscreteScheduler's loop (same sigmas, same shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    process = RectifiedFlow.from_scheduler_config(dict(sched.config))
    field = VelocityField()
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    expected = scheduler_loop(sched, field, z, steps)
    got = euler_sample(denoiser_of(field, process), z, process.grid(steps), process)
    sched.set_timesteps(steps)
    sigmas = [process.sigma(torch.tensor(u), z[:1]).item() for u in process.grid(steps)]
    torch.testing.assert_close(torch.tensor(sigmas), sched.sigmas[:-1], rtol=1e-6, atol=1e-7)
    assert float((got - expected).abs().max()) <= 1e-5
    # DDIM on a rectified flow is the same Euler step, x' = (1 - sigma') x0 + sigma' eps_hat
    assert float((ddim_sample(denoiser_of(field, process), z, process.grid(steps), process) - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_euler_equals_flow_match_euler_dynamic(image_seq_len):
    """With resolution-dependent shifting (Flux's scheduler config) the shift is exp(mu), mu from the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096, shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    process = RectifiedFlow.from_scheduler_config(dict(sched.config), image_seq_len=image_seq_len)
    mu = flux_mu(image_seq_len)
    assert process.shift == pytest.approx(math.exp(mu)) and process.dynamic
    field = VelocityField(seed=2)
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    for steps in (1, 4, 20):
        expected = scheduler_loop(sched, field, z, steps, mu=mu)
        got = euler_sample(denoiser_of(field, process), z, process.grid(steps), process)
        assert float((got - expected).abs().max()) <= 1e-5, steps
    with pytest.raises(ValueError, match="sequence length"):
        RectifiedFlow.from_scheduler_config(dict(sched.config))


def test_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (64, 256, 1000, 4096, 8192):
        assert flux_mu(n) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15), rel=1e-12)


def test_heun_follows_the_closed_form_flow_of_a_gaussian():
    """For x0 ~ N(m, s^2 I) the flow ODE from z ends at m + s z (x_sigma = (1 - sigma) m + std_sigma z keeps the
    standardised coordinate). Euler converges at first order, Heun at second: doubling the steps halves Euler's
    error and quarters Heun's."""
    m, s_data = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.5
    process = RectifiedFlow(shift=3.0)

    def D(x, lv, cond=None):
        a, sig = process.alpha(lv, x), process.sigma(lv, x)
        var = a**2 * s_data**2 + sig**2
        return m + a * s_data**2 / var * (x - a * m)  # E[x0 | x_s]

    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = m + s_data * z

    def error(sampler, n: int) -> float:  # grids ending near 0: the last step (to sigma = 0) is Euler's in both
        return float((sampler(D, z, list(np.linspace(1.0, 1e-5, n)), process) - exact).abs().max())

    e25, e50, h25, h50 = error(euler_sample, 25), error(euler_sample, 50), error(heun_sample, 25), error(heun_sample, 50)
    assert 1.8 < e25 / e50 < 2.2, (e25, e50)
    assert h25 / h50 > 3.5 and h50 < 1e-3 and h50 < 0.01 * e50, (h25, h50, e50)


def test_generator_reaches_pure_noise_level():
    """A flow generator may start at t = T (level 1, sigma 1); a VP one stops at T - 1."""
    process = RectifiedFlow(shift=3.0)
    G = Generator(lambda x, s, c=None: 0.5 * x, process, [1000, 750, 500, 250])
    sigmas = [float(process.sigma(torch.tensor(s), torch.zeros(1))) for s in G.levels]
    assert sigmas == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-12)  # timesteps name sigma x 1000, as diffusers'
    with pytest.raises(ValueError, match=r"within \[0, 1000\]"):
        Generator(lambda x, s, c=None: x, process, [1001])
    x = G(torch.ones(2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_shift_formula():
    u = torch.tensor(np.linspace(0, 1, 11))
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    torch.testing.assert_close(shift_sigmas(u, 3.0), 3 * u / (1 + 2 * u))
    assert float(shift_sigmas(torch.tensor(1.0), 7.0)) == 1.0
    torch.testing.assert_close(unshift_sigmas(shift_sigmas(u, 3.0), 3.0), u)


def test_dm_time_shift_shifts_the_training_draws():
    """distill.dm_time_shift = k maps every drawn level s to k s / (1 + (k - 1) s) (more noise), from the same draws;
    at its default 1 the config dumps (and hashes) as before the field existed."""
    from dmd_core.config import DistillConfig
    from tests.helpers import make_trainer

    plain, shifted = make_trainer(), make_trainer(dm_time_shift=3.0)
    s, s3 = plain._levels(64, 0.02, 0.98), shifted._levels(64, 0.02, 0.98)
    torch.testing.assert_close(s3, shift_sigmas(s, 3.0))
    assert (s3 > s).all()
    assert "dm_time_shift" not in DistillConfig().model_dump() and DistillConfig(dm_time_shift=3).model_dump()["dm_time_shift"] == 3
    with pytest.raises(ValueError):
        DistillConfig(dm_time_shift=0)


def test_flow_presets_validate_their_steps_and_solver():
    """A flow teacher may start at timestep T (sigma 1) and refuses the VP-only PNDM solver; a VP teacher stops at
    T - 1. Each refusal names the field."""
    from dmd_core.config import ConfigError
    from tasks.config import load_config

    assert load_config("sd3-tiny").distill.generator_timesteps[0] == 1000
    for preset, override, field in (("sd3-tiny", "pairs.solver=pndm", "pairs.solver"),
                                    ("flux-tiny", "distill.generator_timesteps=[1001]", "distill.generator_timesteps"),
                                    ("sd-tiny", "distill.generator_timesteps=[1000]", "distill.generator_timesteps")):
        with pytest.raises((ConfigError, ValueError), match=field):
            load_config(preset, None, [override])
