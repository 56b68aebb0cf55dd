"""The embedded default: sklearn's 8x8 digits and a small class-conditional DDPM teacher trained on them."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig, TeacherConfig
from .parametrisations import parametrisation
from .processes import VPDiscrete


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits (shipped with scikit-learn, no download) as images in [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def build_unet(data: DataConfig, teacher: TeacherConfig):
    """A diffusers UNet2DModel; class-conditional models get one extra (null) class for guidance."""
    from diffusers import UNet2DModel

    channels = tuple(teacher.block_out_channels)
    return UNet2DModel(
        sample_size=data.image_size, in_channels=data.channels, out_channels=data.channels,
        layers_per_block=teacher.layers_per_block, block_out_channels=channels,
        down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=8,
        num_class_embeds=data.num_classes + 1 if data.num_classes else None,
    )


def build_scheduler(teacher: TeacherConfig):
    """The teacher's diffusers DDPM scheduler (linear betas), saved with the model."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=teacher.num_train_timesteps, beta_schedule="linear",
                         beta_start=teacher.beta_start, beta_end=teacher.beta_end,
                         prediction_type=teacher.prediction_type or "epsilon", clip_sample=False)


def train_teacher(data: DataConfig, cfg: TeacherConfig, images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device | str = "cpu", progress: Optional[Callable[[int, float], None]] = None):
    """DDPM training (Ho et al. 2020, eps-prediction) with label dropout for classifier-free guidance."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    unet = build_unet(data, cfg).to(device).train()
    process = VPDiscrete.from_scheduler(build_scheduler(cfg))
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / max(cfg.train_steps, 1)))
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    for step in range(cfg.train_steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)
        x0, y = images[idx].to(device), labels[idx].to(device)
        if data.num_classes:
            drop = torch.rand(cfg.batch_size, generator=g).to(device) < cfg.class_dropout
            y = torch.where(drop, torch.full_like(y, data.num_classes), y)
        s = process.level(torch.randint(0, process.T, (cfg.batch_size,), generator=g).to(device))
        eps = torch.randn(x0.shape, generator=g).to(device)
        x_t = process.add_noise(x0, eps, s)
        target = parametrisation(cfg.prediction_type or "epsilon").target(x0, eps, process.alpha(s, x0),
                                                                           process.sigma(s, x0))
        out = unet(x_t, process.c_noise(s), class_labels=y if data.num_classes else None).sample
        loss = F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - min(0.999, (1 + step) / (10 + step)))
        if progress is not None:
            progress(step, float(loss.detach()))
    return ema.cpu(), build_scheduler(cfg)
