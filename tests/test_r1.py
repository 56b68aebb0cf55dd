"""distill.gan.r1_weight: R1 (Mescheder et al. 2018, Eq. 9) on the discriminator's real inputs, exact or approximated
by a perturbed forward; checked against closed forms, and inside the trainer against an independent computation."""
import pytest
import torch

from dmd_core.config import GANConfig
from dmd_core.losses import approximate_r1_penalty, r1_penalty
from tests.helpers import make_trainer


def test_exact_r1_is_the_squared_input_gradient_of_a_quadratic_discriminator():
    """D(x) = sum(x^2) + a.x has grad 2x + a, so R1 = ||2x + a||^2 per sample."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logits = (x ** 2).flatten(1).sum(1) + (x * a).flatten(1).sum(1)
    expected = (2 * x.detach() + a).flatten(1).square().sum(1)
    torch.testing.assert_close(r1_penalty(logits, x), expected)
    # the graph is kept: the penalty has a gradient (2 * 2 (2x + a) per element)
    (grad,) = torch.autograd.grad(r1_penalty(logits, x).sum(), x)
    torch.testing.assert_close(grad, 4 * (2 * x.detach() + a))


def test_approximate_r1_tends_to_the_exact_one():
    """For a linear D(x) = a.x the approximation is (a.eps)^2 per sample, whose mean over eps is ||a||^2 = R1."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, generator=g, dtype=torch.float64)
    x = torch.randn(200_000, 16, generator=g, dtype=torch.float64)
    sigma = 0.01
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    approx = approximate_r1_penalty(x @ a, (x + sigma * eps) @ a, sigma)
    torch.testing.assert_close(approx, (eps @ a).square())
    assert abs(approx.mean().item() / a.square().sum().item() - 1) < 0.02


def test_r1_off_dumps_and_hashes_as_before():
    assert set(GANConfig().model_dump()) == {"enabled", "weight_generator", "weight_discriminator"}
    assert GANConfig(r1_weight=2.0).model_dump()["r1"] == "approximate"


@pytest.mark.parametrize("mode", ["exact", "approximate"])
def test_trainer_adds_gamma_half_r1_to_the_discriminator_loss(mode):
    """A fake-score update with R1: the logged penalty equals R1 recomputed, with the weights from before the update,
    on the real batch, level and noise the update drew; the head's gradient differs from the update without it."""
    gamma, sigma = 5.0, GANConfig().r1_sigma
    grads = {}
    for weight in (0.0, gamma):
        trainer = make_trainer(gan={"enabled": True, "r1_weight": weight, "r1": mode}, fake_updates_per_generator=2)
        trainer.train_step()  # G's step; the next is the fake score's alone
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (trainer.mu_fake, trainer.gan_head)]
        calls, logits_of = [], trainer._gan_logits

        def record(x0, cond, draw=None):
            calls.append((x0.detach().clone(), cond, draw))
            return logits_of(x0, cond, draw)

        trainer._gan_logits = record
        m = trainer.train_step()
        grads[weight] = [p.grad.clone() for p in trainer.gan_head.parameters()]
        if not weight:
            assert "loss_r1" not in m and len(calls) == 2
            continue
        for module, state in zip((trainer.mu_fake, trainer.gan_head), before):
            module.load_state_dict(state)
        (y, cond, draw), fake_call = calls[0], calls[1]
        assert draw is not None and fake_call[2] is None
        if mode == "exact":
            assert len(calls) == 2
            y = y.requires_grad_(True)
            expected = r1_penalty(logits_of(y, cond, draw), y).mean()
        else:  # the real batch again, moved by sigma * eps, at the same level and noise
            perturbed, cond_p, draw_p = calls[2]
            assert draw_p is draw and cond_p is cond
            assert abs((perturbed - y).std().item() / sigma - 1) < 0.1
            with torch.no_grad():
                expected = approximate_r1_penalty(logits_of(y, cond, draw), logits_of(perturbed, cond, draw),
                                                  sigma).mean()
        assert m["loss_r1"] > 0
        assert m["loss_r1"] == pytest.approx(expected.item(), rel=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[gamma]))
