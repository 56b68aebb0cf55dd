"""Generator stepping, the unconditional adapter path and the LPIPS regression loss."""
import pytest
import torch
import torch.nn.functional as F

from dmd_core.denoisers import NetDenoiser
from dmd_core.generator import Generator
from dmd_core.losses import lpips_regression
from dmd_core.perceptual import build_lpips
from dmd_core.processes import VPDiscrete
from tests.helpers import tiny_unet


def test_multistep_generator_renoises_between_steps():
    sched = VPDiscrete.linear()
    D = NetDenoiser(tiny_unet(num_classes=0).eval(), sched)
    G = Generator(D, sched, [999, 499])
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = G(z, None, generator=torch.Generator().manual_seed(1))
        x0 = D(z, torch.full((3,), 1.0), None)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        a, s = sched.alphas[499].float(), sched.sigmas[499].float()
        expected = D(a * x0 + s * eps, torch.full((3,), 499 / 999), None)
        assert torch.allclose(got, expected, atol=1e-6)
        # Backward simulation to the last step reproduces the same rollout, now with grad on the last step.
        assert torch.allclose(G.backward_simulate(z, None, 1, torch.Generator().manual_seed(1)), expected, atol=1e-6)
        g = torch.Generator().manual_seed(1)
        rollout = G.backward_simulate(z, None, 1, noise=lambda x0: torch.randn(x0.shape, generator=g))
        assert torch.allclose(rollout, expected, atol=1e-6)
    with pytest.raises(ValueError, match="strictly decreasing"):
        Generator(D, sched, [499, 999])


def test_lpips_regression_upsamples_to_224_and_is_zero_on_identical_inputs():
    model = build_lpips("vgg", random_trunk=True)
    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    got = lpips_regression(x, y, model)
    up = lambda v: F.interpolate(v.repeat(1, 3, 1, 1), size=(224, 224), mode="bilinear", align_corners=False)  # noqa
    assert torch.allclose(got, model(up(x), up(y)).flatten())
    assert got.shape == (2,) and (got > 0).all()
    assert torch.allclose(lpips_regression(x, x, model), torch.zeros(2), atol=1e-6)


def test_lpips_without_local_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips("vgg")
