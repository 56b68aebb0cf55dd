"""One shared test base for all samplers: Gaussian data has a closed-form denoiser and ODE flow."""
import pytest
import torch

from dmd_core.samplers import SAMPLERS, ddim_sample, euler_sample, sample
from dmd_core.schedules import EDMSchedule, VPSchedule, timestep_grid

M, S = 1.5, 0.5  # data ~ N(M, S^2) in every dimension
SCHEDULES = {"vp": VPSchedule.linear, "edm": EDMSchedule}


def gaussian_denoiser(schedule):
    """E[x | x_t] for x ~ N(M, S^2): M + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha M)."""
    def D(x_t, t, cond=None):
        a, s = schedule.alpha_t(t, x_t), schedule.sigma_t(t, x_t)
        return M + a * S**2 / (a**2 * S**2 + s**2) * (x_t - a * M)
    return D


def exact_flow(schedule, z, t0):
    """The probability-flow ODE is affine for Gaussian data: x0 = M + S (x_T - a M) / sqrt(a^2 S^2 + s^2)."""
    x_T = z * schedule.init_noise_sigma
    a, s = float(schedule.alphas[t0]), float(schedule.sigmas[t0])
    return M + S * (x_T - a * M) / (a**2 * S**2 + s**2) ** 0.5


@pytest.fixture(params=[(name, kind) for name in SAMPLERS for kind in SCHEDULES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, kind = request.param
    schedule = SCHEDULES[kind]()
    z = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return name, schedule, z


def test_samples_match_gaussian_moments(case):
    name, schedule, z = case
    x = sample(name, gaussian_denoiser(schedule), z, timestep_grid(schedule.T, 256), schedule)
    assert abs(x.mean().item() - M) < 0.03, x.mean()
    assert abs(x.std().item() - S) < 0.03 * S, x.std()


def test_more_steps_converge_to_the_exact_flow(case):
    name, schedule, z = case
    errors = [(sample(name, gaussian_denoiser(schedule), z, timestep_grid(schedule.T, n), schedule)
               - exact_flow(schedule, z, schedule.T - 1)).abs().mean().item() for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 8, errors


def test_same_noise_same_sample_bit_for_bit(case):
    name, schedule, z = case
    D = gaussian_denoiser(schedule)
    grid = timestep_grid(schedule.T, 10)
    assert torch.equal(sample(name, D, z, grid, schedule), sample(name, D, z.clone(), grid, schedule))


def test_ddim_equals_euler_on_vp():
    """DDIM (eta=0) is Euler in x/alpha, sigma/alpha: two independent formulas must agree."""
    schedule = VPSchedule.linear()
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D = gaussian_denoiser(schedule)
    grid = timestep_grid(1000, 8)
    assert torch.allclose(ddim_sample(D, z, grid, schedule), euler_sample(D, z, grid, schedule), atol=1e-9)


def test_heun_beats_euler_at_equal_steps():
    schedule = EDMSchedule()
    z = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    D, exact = gaussian_denoiser(schedule), exact_flow(schedule, z, 999)
    err = {n: (sample(n, D, z, timestep_grid(1000, 16), schedule) - exact).abs().mean() for n in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 2, err


def test_bad_grid_and_solver_are_rejected():
    schedule = VPSchedule.linear()
    z = torch.randn(2, 1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(gaussian_denoiser(schedule), z, [10, 20], schedule)
    with pytest.raises(ValueError, match="solver"):
        sample("pndm2", gaussian_denoiser(schedule), z, [10], schedule)
