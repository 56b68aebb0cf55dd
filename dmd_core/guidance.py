"""One student for a range of guidance scales: G(z, c, w) distilled against the real score's CFG at a per-sample w.

Each generator sample draws its own w from [w_min, w_max] (uniform or log-uniform); the real score runs CFG at that
w, and G receives w through an embedding added to its timestep embedding whose projection starts at zero, so G starts
as the teacher. The fake score runs no CFG, but it takes w the same way: it models G's output distribution at each w,
p_fake(x | c, w) (DMD Eq. 6 per w), not the mixture over w, whose score would keep pushing every w apart.

Stable Diffusion students are a `UNet2DConditionModel` with `time_cond_proj_dim` set, fed `timestep_cond` =
the embedding of w - 1 exactly as the stock `StableDiffusionPipeline` computes it from `guidance_scale` (which then
skips CFG). `UNet2DModel` students wrap the network with a `GuidanceEmbedding` applied to its time embedding.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .denoisers import Cond, UNetDenoiser
from .guidance_embedding import GuidanceEmbedding, guidance_scale_embedding

GUIDANCE_LAWS = ("uniform", "log-uniform")


def sample_guidance(n: int, w_range: Sequence[float], law: str, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """n guidance scales in [w_min, w_max]: uniform, or uniform in log w (both from one `torch.rand` draw)."""
    w_min, w_max = float(w_range[0]), float(w_range[1])
    u = torch.rand((n,), generator=generator, device=device)
    if law == "uniform":
        return w_min + (w_max - w_min) * u
    if law == "log-uniform":
        return torch.exp(math.log(w_min) + (math.log(w_max) - math.log(w_min)) * u)
    raise ValueError(f"guidance_law must be one of {GUIDANCE_LAWS}, got {law!r}")


class GuidedUNet2D(nn.Module):
    """A `UNet2DModel` that also takes `guidance_scale` (B,), embedded and added to its time embedding's input."""

    def __init__(self, unet: nn.Module, guidance: GuidanceEmbedding) -> None:
        super().__init__()
        self.unet, self.guidance = unet, guidance

    @property
    def config(self):
        return self.unet.config

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                guidance_scale: Optional[torch.Tensor] = None):
        if guidance_scale is None:
            return self.unet(sample, timestep, class_labels=class_labels)
        with self.guidance.applied(self.unet, guidance_scale):
            return self.unet(sample, timestep, class_labels=class_labels)


def is_text_unet(unet: nn.Module) -> bool:
    """A UNet2DConditionModel (cross-attention, `timestep_cond`), as opposed to a UNet2DModel."""
    return hasattr(getattr(unet, "config", None), "cross_attention_dim")


def guided_unet(unet: nn.Module, embedding_dim: int) -> nn.Module:
    """The teacher's network plus a zero-initialised guidance projection; every other weight copied exactly."""
    if is_text_unet(unet):
        from diffusers import UNet2DConditionModel

        student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": embedding_dim})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"guided student: unexpected weight layout (missing {missing}, unexpected {unexpected})")
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.to(next(unet.parameters()).device)
    channels = unet.time_embedding.linear_1.in_features
    guidance = GuidanceEmbedding(embedding_dim, channels).to(next(unet.parameters()).device)
    return GuidedUNet2D(copy.deepcopy(unet), guidance)


def guided_denoiser(denoiser: UNetDenoiser, embedding_dim: int) -> UNetDenoiser:
    """A trainable D(x_t, t, cond) whose network also takes the guidance scale; equals `denoiser` at start."""
    student = UNetDenoiser(guided_unet(denoiser.unet, embedding_dim), denoiser.schedule, denoiser.prediction_type)
    return student.requires_grad_(True).train()


def student_cond(denoiser: nn.Module, cond: Cond, w: torch.Tensor) -> Cond:
    """The guided student's condition: `cond` plus w (B,), as keyword arguments of its network.

    Text UNets get `timestep_cond` = embedding(w - 1, time_cond_proj_dim) (StableDiffusionPipeline's);
    `GuidedUNet2D` gets `guidance_scale` = w and class ids as `class_labels`.
    """
    denoiser = getattr(denoiser, "module", denoiser)  # DistributedDataParallel
    unet = getattr(denoiser, "unet", denoiser)
    if is_text_unet(unet):
        dim = unet.config.time_cond_proj_dim
        emb = guidance_scale_embedding(w.float() - 1, dim).to(w.device)
        return {**cond, "timestep_cond": emb}
    out = {"guidance_scale": w}
    if isinstance(cond, dict):
        return {**cond, **out}
    return out if cond is None else {"class_labels": cond, **out}


def load_guided_student(denoiser: UNetDenoiser, weights: dict[str, torch.Tensor], embedding_dim: int) -> UNetDenoiser:
    """A frozen guided student holding a checkpoint's generator weights."""
    student = guided_denoiser(denoiser, embedding_dim)
    student.load_state_dict(weights)
    return student.eval().requires_grad_(False)


class GuidedGenerator(nn.Module):
    """G(z, c) at one fixed guidance scale w: a `Generator` over a guided denoiser with w folded into the condition."""

    def __init__(self, generator: nn.Module, w: float) -> None:
        super().__init__()
        self.generator, self.w = generator, float(w)

    def forward(self, z: torch.Tensor, cond: Cond = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        w = torch.full((z.shape[0],), self.w, device=z.device)
        return self.generator(z, student_cond(self.generator.denoiser, cond, w), generator=generator)


def shown_scale(d) -> float:
    """The one w at which a guided student is shown when no scale is asked for: `guidance`, clamped to the range."""
    return min(max(float(d.guidance), d.guidance_range[0]), d.guidance_range[1])


def student_denoiser(teacher, weights: dict[str, torch.Tensor], d) -> nn.Module:
    """A checkpoint's generator weights on the teacher's architecture, guided when `d.guidance_range` is set."""
    if d.guidance_range is None:
        return teacher.student(weights)
    return load_guided_student(teacher.denoiser, weights, d.guidance_embedding_dim)


def student_at(generator: nn.Module, d, w: Optional[float] = None) -> nn.Module:
    """G(z, c) at scale w (default `shown_scale`) for a guided student; a fixed-guidance one is returned as is."""
    if d.guidance_range is None:
        return generator
    return GuidedGenerator(generator, shown_scale(d) if w is None else w)
