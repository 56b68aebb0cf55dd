"""One shared test base for all samplers: Gaussian data has a closed-form denoiser and ODE flow."""
import pytest
import torch

from dmd_core.samplers import SAMPLERS, ddim_sample, euler_sample, pndm_grid, pndm_sample, sample
from dmd_core.processes import EDM, VPDiscrete, full_level, timestep_grid

M, S = 1.5, 0.5  # data ~ N(M, S^2) in every dimension
SCHEDULES = {"vp": VPDiscrete.linear, "edm": EDM}


def gaussian_denoiser(schedule):
    """E[x | x_t] for x ~ N(M, S^2): M + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha M)."""
    def D(x_t, t, cond=None):
        a, s = schedule.alpha(t, x_t), schedule.sigma(t, x_t)
        return M + a * S**2 / (a**2 * S**2 + s**2) * (x_t - a * M)
    return D


def exact_flow(schedule, z, level=1.0):
    """The probability-flow ODE is affine for Gaussian data: x0 = M + S (x_T - a M) / sqrt(a^2 S^2 + s^2)."""
    x_T = z * schedule.init_noise_sigma
    one = torch.zeros(1, dtype=torch.float64)
    a, s = float(schedule.alpha(full_level(level, one), one)), float(schedule.sigma(full_level(level, one), one))
    return M + S * (x_T - a * M) / (a**2 * S**2 + s**2) ** 0.5


@pytest.fixture(params=[(name, kind) for name in SAMPLERS for kind in SCHEDULES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, kind = request.param
    schedule = SCHEDULES[kind]()
    z = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return name, schedule, z


def test_samples_match_gaussian_moments(case):
    name, schedule, z = case
    x = sample(name, gaussian_denoiser(schedule), z, schedule.grid(256), schedule)
    assert abs(x.mean().item() - M) < 0.03, x.mean()
    assert abs(x.std().item() - S) < 0.03 * S, x.std()


def test_more_steps_converge_to_the_exact_flow(case):
    name, schedule, z = case
    errors = [(sample(name, gaussian_denoiser(schedule), z, schedule.grid(n), schedule)
               - exact_flow(schedule, z)).abs().mean().item() for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 8, errors


def test_same_noise_same_sample_bit_for_bit(case):
    name, schedule, z = case
    D = gaussian_denoiser(schedule)
    grid = schedule.grid(10)
    assert torch.equal(sample(name, D, z, grid, schedule), sample(name, D, z.clone(), grid, schedule))


def test_ddim_equals_euler_on_vp():
    """DDIM (eta=0) is Euler in x/alpha, sigma/alpha: two independent formulas must agree."""
    schedule = VPDiscrete.linear()
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D = gaussian_denoiser(schedule)
    grid = schedule.grid(8)
    assert torch.allclose(ddim_sample(D, z, grid, schedule), euler_sample(D, z, grid, schedule), atol=1e-9)


def test_heun_beats_euler_at_equal_steps():
    schedule = EDM()
    z = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    D, exact = gaussian_denoiser(schedule), exact_flow(schedule, z)
    err = {n: (sample(n, D, z, schedule.grid(16), schedule) - exact).abs().mean() for n in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 2, err


def test_bad_grid_and_solver_are_rejected():
    schedule = VPDiscrete.linear()
    z = torch.randn(2, 1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(gaussian_denoiser(schedule), z, [0.1, 0.2], schedule)
    with pytest.raises(ValueError, match="solver"):
        sample("pndm2", gaussian_denoiser(schedule), z, [0.5], schedule)


def _diffusers_pndm(unet, scheduler, z, y, n):
    """diffusers' own loop: set_timesteps, then eps = unet(x, t); x = scheduler.step(eps, t, x).prev_sample."""
    scheduler.set_timesteps(n)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, class_labels=y).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("n, set_alpha_to_one, dtype, rtol", [
    (1, False, "float64", 1e-10), (2, True, "float64", 1e-10), (10, False, "float64", 1e-10),
    (10, True, "float64", 1e-10), (50, False, "float32", 1e-5)])
def test_pndm_matches_diffusers_scheduler_on_a_real_unet(n, set_alpha_to_one, dtype, rtol):
    """pndm_sample on pndm_grid = diffusers' PNDMScheduler loop in the Stable Diffusion config, class labels as cond.

    float64: the scheduler's tables are cast to float64 too, so the two agree to rounding (measured ~1e-15 of
    max|x|); float32, 50 steps as in DMD App. B.3: the stock scheduler, whose float32 coefficients leave ~6e-7.
    """
    from diffusers import PNDMScheduler

    from dmd_core.denoisers import NetDenoiser
    from tests.helpers import tiny_unet

    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                              set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    schedule = VPDiscrete.from_scheduler(scheduler)
    dtype = getattr(torch, dtype)
    if dtype == torch.float64:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    unet = tiny_unet(num_classes=10).to(dtype).eval()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    y = torch.tensor([3, 7])
    with torch.no_grad():
        expected = _diffusers_pndm(unet, scheduler, z, y, n)
    got = pndm_sample(NetDenoiser(unet, schedule, "epsilon"), z, schedule.levels(pndm_grid(1000, n, steps_offset=1)), schedule, y,
                      set_alpha_to_one=set_alpha_to_one)
    assert (got - expected).abs().max() <= rtol * expected.abs().max(), (got - expected).abs().max()


@pytest.mark.parametrize("steps_offset, n", [(0, 7), (1, 3), (1, 50)])
def test_pndm_grid_is_diffusers_timesteps_without_the_repeat(steps_offset, n):
    """diffusers' skip_prk_steps list is the leading grid with its 2nd timestep repeated (the improved-Euler step)."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=steps_offset)
    scheduler.set_timesteps(n)
    grid = pndm_grid(1000, n, steps_offset)
    assert scheduler.timesteps.tolist() == grid[:2] + grid[1:]
    assert all(a - b == 1000 // n for a, b in zip(grid, grid[1:])) and grid[-1] - 1000 // n < 0


def test_pndm_grid_rejects_an_offset_past_the_step():
    with pytest.raises(ValueError, match="steps_offset"):
        pndm_grid(1000, 1000, steps_offset=1)


@pytest.mark.parametrize("n", [10, 50])
def test_ddim_x0_matches_diffusers_scheduler_on_the_digits_teacher(n):
    """Our DDIM's x0 predictions equal diffusers' DDIMScheduler loop (trailing, no clipping) on a real teacher."""
    from pathlib import Path

    from diffusers import DDIMScheduler

    from dmd_core.teachers import load_teacher

    teacher = load_teacher("unet2d", Path(__file__).resolve().parent.parent / "teachers" / "digits")
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(n)
    z = torch.randn((8, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    cond = torch.arange(8)
    seen = []

    def recording(x_t, t, c):
        x0 = teacher.denoiser(x_t, t, c)
        seen.append(x0)
        return x0

    ours = ddim_sample(recording, z, teacher.process.grid(n), teacher.process, cond)
    x, theirs = z.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = teacher.net(x, t, class_labels=cond).sample
            step = scheduler.step(out, t, x)
            x = step.prev_sample
            theirs.append(step.pred_original_sample)
    assert [int(t) for t in scheduler.timesteps] == timestep_grid(1000, n)
    for a, b in zip(seen, theirs):
        assert float((a - b).abs().max()) < 2e-5
    assert float((ours - theirs[-1]).abs().max()) < 2e-5
