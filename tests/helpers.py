"""Tiny real diffusers models for tests (random init, right shape, no download)."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from dmd_core.denoisers import NetDenoiser
from dmd_core.processes import VPDiscrete


def tiny_unet(num_classes: int = 10, channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    """A two-level UNet2DModel for 8x8 images, class-conditional when num_classes > 0 (plus a null class)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def tiny_teacher(num_classes: int = 10, seed: int = 0) -> NetDenoiser:
    """A random-init teacher denoiser on the DDPM linear schedule."""
    return NetDenoiser(tiny_unet(num_classes, seed=seed), VPDiscrete.linear(), "epsilon")


def make_trainer(stream_cls=None, device="cpu", **overrides):
    """A DMD2-style trainer on a tiny UNet exercising every piece of state: GAN head, TTUR, 2-step G, EMA."""
    from dmd_core.config import DistillConfig
    from dmd_core.streams import TensorStream
    from dmd_core.trainer import DMDTrainer

    teacher = tiny_teacher()
    g = torch.Generator().manual_seed(123)
    n = 48
    tensors = {"z": torch.randn(n, 1, 8, 8, generator=g), "y": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1,
               "cond": torch.randint(0, 10, (n,), generator=g)}
    stream_cls = stream_cls or TensorStream
    cfg = dict(batch_size=8, regression="mse", lambda_reg=0.5, generator_timesteps=[999, 499],
               fake_updates_per_generator=2, ema_decay=0.9, lr=1e-3, gan={"enabled": True})
    cfg.update(overrides)
    return DMDTrainer(DistillConfig(**cfg), teacher, teacher.process, (1, 8, 8), num_classes=10, null_cond=10,
                      pairs=stream_cls(tensors, 8, seed=1), real=TensorStream(tensors, 8, seed=2), device=device)
