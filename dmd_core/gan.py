"""DMD2 GAN head: a small classifier on the fake score network's bottleneck (a UNet's mid-block) features."""
from __future__ import annotations

import torch
from torch import nn


class GANHead(nn.Module):
    """Conv classifier on mid-block features -> one logit per sample (DMD2 §4.2)."""

    def __init__(self, in_channels: int, hidden: int = 256) -> None:
        super().__init__()
        groups = 32 if in_channels % 32 == 0 else 1
        self.net = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


class BottleneckFeatures:
    """Captures the output of the fake score network's bottleneck (its backbone says which module) on every forward."""

    def __init__(self, denoiser: nn.Module) -> None:
        if not hasattr(denoiser, "backbone"):
            raise ValueError("the GAN head needs a network denoiser (NetDenoiser) whose backbone has a bottleneck")
        module, self.channels = denoiser.backbone.bottleneck(denoiser.net)
        self.features = denoiser.backbone.features
        self.value: torch.Tensor | None = None
        self.enabled = True  # off in a phase without the GAN (distill.phases): nothing captured
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self.enabled:
            self.value = self.features(output)

    def take(self) -> torch.Tensor:
        """Return and clear the last captured features."""
        if self.value is None:
            raise RuntimeError("no bottleneck features captured: run the fake score network first")
        value, self.value = self.value, None
        return value
