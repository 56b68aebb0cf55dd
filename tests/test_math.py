"""Exact-answer tests for conversions, guidance and the DMD losses."""
import pytest
import torch

from dmd_core.denoisers import CFGDenoiser, NetDenoiser
from dmd_core.parametrisations import PARAMETRISATIONS, parametrisation
from dmd_core.losses import (denoising_loss, distribution_matching_loss, dm_gradient, dm_loss,
                             gan_discriminator_loss, gan_generator_loss, pseudo_huber_regression)
from dmd_core.processes import EDM, VPDiscrete, timestep_grid
from tests.helpers import tiny_unet


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _vp_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = VPDiscrete.linear()
    t = s.level(torch.randint(0, 1000, (6,), generator=g))
    x0 = torch.randn(6, 2, 4, 4, generator=g)
    eps = torch.randn(6, 2, 4, 4, generator=g)
    return s, t, x0, eps, s.alpha(t, x0), s.sigma(t, x0)


def test_vp_schedule_is_variance_preserving():
    s = VPDiscrete.linear()
    assert torch.allclose(s.alphas**2 + s.sigmas**2, torch.ones(1000, dtype=torch.float64))
    assert s.alphas[0] > 0.99 and s.alphas[-1] < 0.01


def test_edm_schedule_endpoints_and_weight():
    s = EDM()
    like = torch.zeros(3, 1)
    t = torch.tensor([0.0, 0.5, 1.0])
    assert s.sigma(t, like)[0].item() == pytest.approx(0.002) and s.sigma(t, like)[-1].item() == pytest.approx(80.0)
    sigma = s.sigma(t, like)
    assert torch.allclose(s.denoising_weight(t, like), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


def test_eps_x0_v_round_trips():
    """Each parametrisation's target at (x0, eps) converts back to x0 (closed forms of DMD App. H)."""
    _, _, x0, eps, a, s = _vp_state()
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    assert torch.allclose((x_t - s * eps) / a, x0) and torch.allclose(a * x_t - s * v, x0)  # the VP identities
    for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        p = PARAMETRISATIONS[kind]
        assert torch.allclose(p.target(x0, eps, a, s), out)
        assert torch.allclose(p.to_x0(out, x_t, a, s), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        parametrisation("score")


def test_parametrisation_loss_weight_is_its_mse_in_x0_space():
    """|out(x0_hat) - out(x0)|^2 = loss_weight(SNR) |x0_hat - x0|^2 at the same x_t, for eps, v and x0 outputs."""
    _, _, x0, eps, a, s = _vp_state()
    x_t = a * x0 + s * eps
    x0_hat = x0 + 0.3 * torch.randn_like(x0)
    for p in PARAMETRISATIONS.values():
        eps_hat = (x_t - a * x0_hat) / s  # the eps implied by predicting x0_hat at this x_t
        out, out_hat = p.target(x0, eps, a, s), p.target(x0_hat, eps_hat, a, s)
        lhs = ((out_hat - out) ** 2).flatten(1).sum(1)
        rhs = p.loss_weight((a / s) ** 2).flatten() * ((x0_hat - x0) ** 2).flatten(1).sum(1)
        assert torch.allclose(lhs, rhs, rtol=1e-4), p.name


def test_unet_denoiser_applies_the_eps_conversion():
    torch.set_default_dtype(torch.float32)
    unet = tiny_unet(num_classes=10).eval()
    sched = VPDiscrete.linear()
    D = NetDenoiser(unet, sched, "epsilon")
    x_t, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 990]), torch.tensor([1, 2, 10])
    eps = unet(x_t, t, class_labels=c).sample
    s = sched.level(t)
    expected = (x_t - sched.sigma(s, x_t) * eps) / sched.alpha(s, x_t)
    assert torch.equal(sched.c_noise(s), t)  # a discrete VP network takes its DDPM index
    assert torch.allclose(D(x_t, s, c), expected, atol=1e-5)


def test_cfg_wrapper_equals_formula():
    def D(x, t, c):
        return x * (c.reshape(-1, 1).to(x.dtype) + 1) + t.reshape(-1, 1)

    x, t, c = torch.randn(4, 3), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    w = 3.5
    null = torch.full_like(c, 10)
    expected = D(x, t, null) + w * (D(x, t, c) - D(x, t, null))
    assert torch.allclose(CFGDenoiser(D, w, 10)(x, t, c), expected)


def test_dm_loss_gradient_is_grad_over_numel_and_points_to_real():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g, requires_grad=True)
    mu_real, mu_fake = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    grad = dm_gradient(x.detach(), x.detach(), mu_real, mu_fake, None, None, "dmd")
    w = (x.detach() - mu_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, (mu_fake - mu_real) / w)
    distribution_matching_loss(x, grad).mean().backward()
    assert torch.allclose(x.grad, grad / x.numel())
    # Gradient descent moves x toward mu_real and away from mu_fake (start at x = mu_fake).
    x_start = mu_fake.clone()
    grad = dm_gradient(x_start, x_start, mu_real, mu_fake, None, None, "dmd")
    x_next = x_start - 0.01 * grad
    assert (x_next - mu_real).norm() < (x_start - mu_real).norm()
    assert (x_next - mu_fake).norm() > (x_start - mu_fake).norm()


@pytest.mark.parametrize("weighting,closed_form", [
    ("sigma_over_alpha", lambda a, s, df: a * df / s),
    ("sigma3_over_alpha", lambda a, s, df: a * s * df),
])
def test_score_weightings_match_closed_form(weighting, closed_form):
    s, t, x0, eps, a, sig = _vp_state(2)
    x_t = a * x0 + sig * eps
    mu_real, mu_fake = x0 + 0.1, x0 - 0.2
    grad = dm_gradient(x0, x_t, mu_real, mu_fake, a, sig, weighting)
    assert torch.allclose(grad, closed_form(a, sig, mu_fake - mu_real))


def test_dm_loss_diffuses_with_the_schedule_and_is_zero_when_scores_agree():
    s, t, x0, eps, a, sig = _vp_state(3)
    seen = {}

    def real(x_t, tt, c):
        seen["x_t"] = x_t
        return x_t * 0 + 1.0

    loss, grad = dm_loss(x0, real, real, s, t, eps)
    assert torch.allclose(seen["x_t"], a * x0 + sig * eps)
    assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(loss) == 0


def test_denoising_loss_uses_snr_weight():
    s, t, x0, eps, a, sig = _vp_state(4)
    pred = x0 + 0.5
    w = s.denoising_weight(t, x0)
    assert torch.allclose(w.flatten(), (a**2 / sig**2).flatten())
    assert torch.allclose(denoising_loss(pred, x0, w), (a**2 / sig**2).flatten() * 0.25)
    # A v-prediction teacher's uniform v-MSE equals (SNR + 1) x the x0-MSE at the same x_t (VP: 1/sigma^2).
    x_t = a * x0 + sig * eps
    v_of = lambda x0_: (a * x_t - x0_) / sig  # noqa: E731  v = (alpha x_t - x0) / sigma for VP
    v_mse = ((v_of(pred) - v_of(x0)) ** 2).flatten(1).mean(1)
    assert torch.allclose(denoising_loss(pred, x0, s.denoising_weight(t, x0, "v_prediction")), v_mse)
    assert torch.equal(s.denoising_weight(t, x0, "sample"), torch.ones_like(w))


def test_pseudo_huber_and_gan_losses():
    x, y = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    c = 0.5
    assert torch.allclose(pseudo_huber_regression(x, y, c), torch.full((2,), (4 + c * c) ** 0.5 - c))
    logits = torch.tensor([0.0, 2.0])
    assert torch.allclose(gan_generator_loss(logits), torch.log1p(torch.exp(-logits)))
    expected = torch.log1p(torch.exp(-logits)) + torch.log1p(torch.exp(logits.flip(0)))
    assert torch.allclose(gan_discriminator_loss(logits, logits.flip(0)), expected)


def test_timestep_grid_trailing():
    assert timestep_grid(1000, 4) == [999, 749, 499, 249]
    assert timestep_grid(1000, 1) == [999]
    with pytest.raises(ValueError):
        timestep_grid(1000, 0)
