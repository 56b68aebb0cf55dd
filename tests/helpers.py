"""Tiny real diffusers models for tests (random init, right shape, no download)."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from dmd_core.denoisers import UNetDenoiser
from dmd_core.schedules import VPSchedule


def tiny_unet(num_classes: int = 10, channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    """A two-level UNet2DModel for 8x8 images, class-conditional when num_classes > 0 (plus a null class)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def tiny_teacher(num_classes: int = 10, seed: int = 0) -> UNetDenoiser:
    """A random-init teacher denoiser on the DDPM linear schedule."""
    return UNetDenoiser(tiny_unet(num_classes, seed=seed), VPSchedule.linear(), "epsilon")
