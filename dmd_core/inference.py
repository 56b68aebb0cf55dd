"""Fast one-step generation on CUDA: half precision, channels_last, fused QKV projections, torch.compile."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

INFERENCE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _inductor_flags() -> None:
    """1x1 convolutions as matrix multiplies (they are, in NHWC); the rest stays at inductor's defaults."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True


def _prepare(module: nn.Module, compiled: nn.Module, mode: str, dtype: torch.dtype) -> nn.Module:
    """`module` in `dtype`, NHWC, with fused QKV projections where it has attention; `compiled` (the module or
    the part of it that does the work) compiled in place unless mode is none."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
    module.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)
    if hasattr(module, "fuse_qkv_projections"):
        module.fuse_qkv_projections()
    if mode != "none":
        _inductor_flags()
        compiled.compile(mode=mode, fullgraph=True, dynamic=False)
    return module


def fast_unet(unet: nn.Module, mode: str = "reduce-overhead", dtype: torch.dtype = torch.float16) -> nn.Module:
    """The denoising network made fast in place (see `_prepare`)."""
    return _prepare(unet, unet, mode, dtype)


def fast_decoder(vae: nn.Module, mode: str = "reduce-overhead", dtype: torch.dtype = torch.float16) -> nn.Module:
    """An AutoencoderKL or AutoencoderTiny made fast in place; its decoder is what gets compiled."""
    return _prepare(vae, vae.decoder, mode, dtype)


def fast_modules(unet: nn.Module, vae: Optional[nn.Module], mode: str = "reduce-overhead",
                 dtype: torch.dtype = torch.float16,
                 decoder_mode: Optional[str] = None) -> tuple[nn.Module, Optional[nn.Module]]:
    """`fast_unet` and `fast_decoder` together (the decoder may be None for pixel-space models); the decoder is
    compiled with `decoder_mode` when given, else with `mode`."""
    decoder = fast_decoder(vae, decoder_mode or mode, dtype) if vae is not None else None
    return fast_unet(unet, mode, dtype), decoder


def fast_pipeline(pipe, mode: str = "reduce-overhead", dtype: torch.dtype = torch.float16):
    """A stock diffusers pipeline (StableDiffusionPipeline, DDIMPipeline, DMDPipeline) made fast in place."""
    if getattr(pipe, "device", torch.device("cpu")).type != "cuda":
        return pipe
    fast_unet(pipe.unet, mode, dtype)
    if getattr(pipe, "vae", None) is not None:
        fast_decoder(pipe.vae, mode, dtype)
    if getattr(pipe, "text_encoder", None) is not None:
        pipe.text_encoder.to(dtype)
    return pipe


class OneStep:
    """x0 = (x_T - sigma_T eps(x_T, T)) / alpha_T, then the decoder: one-step latent generation (DMD Eq. 1)."""

    def __init__(self, unet: nn.Module, vae: Optional[nn.Module], scheduler, t: int = 999,
                 dtype: torch.dtype = torch.float16) -> None:
        self.unet, self.vae, self.t, self.dtype = unet, vae, t, dtype
        abar = scheduler.alphas_cumprod[t].double()
        self.alpha, self.sigma = float(abar.sqrt()), float((1 - abar).sqrt())
        self.scale = float(getattr(getattr(vae, "config", None), "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = z.to(self.dtype)
        t = torch.full((z.shape[0],), self.t, device=z.device, dtype=torch.long)
        kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        eps = self.unet(z, t, **kwargs).sample
        x0 = (z - self.sigma * eps) / self.alpha
        if self.vae is None:
            return x0
        return self.vae.decode(x0 / self.scale).sample
