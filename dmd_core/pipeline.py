"""A diffusers pipeline for DMD generators: x0 = G(z) at t* (one step) or DMD2's re-noising steps.

Self-contained (imports only torch and diffusers) so it is shipped as `pipeline.py` in every export and
plain diffusers loads it: `DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput


class DMDPipeline(DiffusionPipeline):
    """Few-step sampling with a distilled UNet2DModel over its teacher's DDPM/DDIM noise schedule."""

    model_cpu_offload_seq = "unet"
    _optional_components = ["guidance"]

    def __init__(self, unet, scheduler, generator_timesteps: Optional[Sequence[int]] = None,
                 prediction_type: str = "epsilon", guidance=None, guidance_scale: Optional[float] = None) -> None:
        super().__init__()
        # `guidance`: a guided student's GuidanceEmbedding (guidance/guidance_embedding.py), else None.
        self.register_modules(unet=unet, scheduler=scheduler, guidance=guidance)
        timesteps = list(generator_timesteps or [scheduler.config.num_train_timesteps - 1])
        self.register_to_config(generator_timesteps=[int(t) for t in timesteps], prediction_type=prediction_type,
                                guidance_scale=guidance_scale)

    def _alpha_sigma(self, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.scheduler.alphas_cumprod[t].double()
        return abar.sqrt().to(like), (1 - abar).sqrt().to(like)

    def denoise(self, x_t: torch.Tensor, t: int, class_labels: Optional[torch.Tensor],
                guidance_scale: Optional[float] = None) -> torch.Tensor:
        """x0 prediction D(x_t, t, cond[, w]) from the UNet output (eps-, v- or x0-prediction)."""
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        if getattr(self, "guidance", None) is not None and guidance_scale is not None:
            w = torch.full((x_t.shape[0],), float(guidance_scale), device=x_t.device)
            with self.guidance.applied(self.unet, w):
                out = self.unet(x_t, tt, class_labels=class_labels).sample.to(x_t.dtype)
        else:
            out = self.unet(x_t, tt, class_labels=class_labels).sample.to(x_t.dtype)
        alpha, sigma = self._alpha_sigma(t, x_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x_t - sigma * out) / alpha
        if kind == "v_prediction":
            return alpha * x_t - sigma * out
        return out

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels: Optional[Union[int, Sequence[int], torch.Tensor]] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 output_type: str = "pil", return_dict: bool = True, guidance_scale: Optional[float] = None):
        """Sample images; `latents` is the input noise z ~ N(0, I); outputs in [0, 1] ('latent': raw x0).

        `guidance_scale`: the scale a guided student runs at (one network call, no CFG); default the export's."""
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        cfg = self.unet.config
        device = self.unet.device
        if latents is None:
            shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        x = latents.to(device=device, dtype=self.unet.dtype) * float(self.scheduler.init_noise_sigma)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=device).long().reshape(-1).expand(x.shape[0])
        timesteps = self.config.generator_timesteps
        for i, t in enumerate(timesteps):
            x0 = self.denoise(x, t, class_labels, guidance_scale)
            if i + 1 < len(timesteps):
                eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                alpha, sigma = self._alpha_sigma(timesteps[i + 1], x0)
                x = alpha * x0 + sigma * eps
        if output_type == "latent":
            return ImagePipelineOutput(images=x0) if return_dict else (x0,)
        images = (x0 / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        return ImagePipelineOutput(images=out) if return_dict else (out,)
