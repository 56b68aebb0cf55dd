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

from typing import Optional, Sequence

import torch
from torch import nn

from .denoisers import Cond, NetDenoiser
from .draws import Draws

GUIDANCE_LAWS = ("uniform", "log-uniform")


def sample_guidance(n: int, w_range: Sequence[float], law: str, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """n guidance scales in [w_min, w_max]: uniform, or uniform in log w (both from one `torch.rand` draw)."""
    if law not in GUIDANCE_LAWS:
        raise ValueError(f"guidance_law must be one of {GUIDANCE_LAWS}, got {law!r}")
    return Draws(generator, torch.device(device)).guidance(n, w_range, law)


def guided_denoiser(denoiser: NetDenoiser, embedding_dim: int) -> NetDenoiser:
    """A trainable D(x_s, s, cond) whose network also takes the guidance scale; equals `denoiser` at start."""
    net = denoiser.backbone.guided(denoiser.net, embedding_dim)
    return NetDenoiser(net, denoiser.process, denoiser.prediction_type).requires_grad_(True).train()


def guided_roles(d, teacher: nn.Module, fake_init: Optional[nn.Module], device: torch.device) -> tuple:
    """(teacher, generator_init, fake_init) of a student for every w in distill.guidance_range: G(z, c, w) against
    the real score's CFG at each sample's own w."""
    if not isinstance(teacher, NetDenoiser):
        raise TypeError("distill.guidance_range needs a network teacher, or `generator_init` taking w")
    if d.lora_rank and fake_init is None:
        # One guided base for every role: without w it is the teacher (the real score); the adapters of G and the
        # fake score also adapt its zero guidance projection (a LoRA target), so each learns its own.
        base = guided_denoiser(teacher, d.guidance_embedding_dim).to(device).eval()
        return base.requires_grad_(False), None, None
    generator = guided_denoiser(teacher, d.guidance_embedding_dim)
    # The fake score models G's distribution at each w, so it takes w too (no CFG): p_fake(x | c, w).
    fake = fake_init if fake_init is not None else guided_denoiser(teacher, d.guidance_embedding_dim)
    return teacher, generator, fake


def student_cond(denoiser: nn.Module, cond: Cond, w: torch.Tensor) -> Cond:
    """The guided student's condition: `cond` plus w (B,), as its backbone passes it (text UNets: `timestep_cond` =
    embedding(w - 1), StableDiffusionPipeline's; `GuidedUNet2D`: `guidance_scale` = w)."""
    denoiser = getattr(denoiser, "module", denoiser)  # DistributedDataParallel
    return denoiser.backbone.guidance_cond(denoiser.net, cond, w)


def load_guided_student(denoiser: NetDenoiser, weights: dict[str, torch.Tensor], embedding_dim: int) -> NetDenoiser:
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
    """A checkpoint's generator weights on the teacher's architecture, guided when `d.guidance_range` is set; a LoRA
    student's adapter merged into the teacher's weights."""
    if d.lora_rank:
        from .adapters import merged_state_dict, student_lora_targets

        if d.guidance_range is None:
            targets = student_lora_targets(d, teacher.denoiser)
            return teacher.student(merged_state_dict(teacher.denoiser, weights, d.lora_rank, d.lora_alpha, targets))
        base = guided_denoiser(teacher.denoiser, d.guidance_embedding_dim)  # the guided base the adapters trained on
        merged = merged_state_dict(base, weights, d.lora_rank, d.lora_alpha, student_lora_targets(d, base))
        return load_guided_student(teacher.denoiser, merged, d.guidance_embedding_dim)
    if d.guidance_range is None:
        return teacher.student(weights)
    return load_guided_student(teacher.denoiser, weights, d.guidance_embedding_dim)


def student_at(generator: nn.Module, d, w: Optional[float] = None) -> nn.Module:
    """G(z, c) at scale w (default `shown_scale`) for a guided student; a fixed-guidance one is returned as is."""
    if d.guidance_range is None:
        return generator
    return GuidedGenerator(generator, shown_scale(d) if w is None else w)
