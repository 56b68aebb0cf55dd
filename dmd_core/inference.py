"""Fast one-step generation on CUDA: half precision, channels_last, fused QKV projections, torch.compile."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

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


def _cast_input(dtype: torch.dtype) -> Callable:
    """A forward pre-hook casting a module's first positional input to `dtype`."""

    def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype != dtype:
            return (args[0].to(dtype), *args[1:])
        return None

    return hook


def fast_teacher_decoder(teacher, dtype: torch.dtype = torch.bfloat16, mode: str = "reduce-overhead") -> None:
    """The teacher's VAE made fast in place (`fast_decoder`), its decoder taking latents of any float dtype, so
    `teacher.decode(x)` works as before (images in `dtype`); a second call with the same dtype does nothing."""
    vae = getattr(teacher, "vae", None)
    if vae is None:
        return
    decoder = vae.decoder
    if next(decoder.parameters()).dtype == dtype and getattr(decoder, "_compiled_call_impl", None) is not None:
        return
    fast_decoder(vae, mode, dtype)
    for part in (getattr(vae, "post_quant_conv", None), decoder):
        if part is not None:
            part.register_forward_pre_hook(_cast_input(dtype))


def half_text_encoders(teacher, dtype: torch.dtype = torch.bfloat16):
    """A view of `teacher` whose text encoders are copies in `dtype`, everything else shared: the fast path's
    caption encoding, as a stock pipeline loaded in half precision encodes (`teacher` itself keeps its encoders'
    precision). A teacher without text encoders is returned as it is."""
    encoders = getattr(teacher, "encoders", None)
    if not encoders:
        return teacher
    return dataclasses.replace(teacher, encoders={k: copy.deepcopy(v).to(dtype) for k, v in encoders.items()})


class InAutocast(nn.Module):
    """`module(...)` under autocast to `dtype`: a network whose weights are already in `dtype` then only has its
    inputs cast, and the math around it (a generator's x0 conversion) stays in its own precision, as it does
    under the evaluate stage's autocast."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        device = next(self.module.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype):
            return self.module(*args, **kwargs)


def _network(generator: nn.Module) -> nn.Module:
    """The denoising network inside a `Generator` (or a `GuidedGenerator` around one)."""
    inner = getattr(generator, "generator", generator)
    net = getattr(getattr(inner, "denoiser", None), "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError(f"fast_generation needs a Generator over a NetDenoiser, got {type(generator).__name__}")
    return net


def fast_generation(generator: nn.Module, teacher=None, dtype: torch.dtype = torch.bfloat16,
                    mode: str = "reduce-overhead", decoder_mode: Optional[str] = None) -> nn.Module:
    """A student generator for evaluation on CUDA: its network in `dtype`, NHWC, fused QKV, compiled in place,
    run under autocast to `dtype`; the teacher's decoder made fast in place too (`fast_teacher_decoder`).

    Returns G' with G'(z, cond, generator=None) -> x0 in the generator's output dtype (float32), the x0
    conversion and re-noising in float32 as under `accel.autocast`. The contract:
    - pass a checkpoint's own generator (the student's copy of the network is changed in place) and call G'
      under no_grad on CUDA, then `teacher.decode` as before;
    - the networks are compiled for one shape (`dynamic=False`): keep the batch fixed (`generate_images(...,
      fixed_batch=True)`); the first two calls compile and record the CUDA graphs (`reduce-overhead`), so let
      nothing else run on the GPU beside them (`ImageScores(warmup_batches=2)` scores those two batches inline);
    - the teacher's VAE stays in `dtype` afterwards (its decoder casts its input), for the teacher's rows too.
    `mode` is torch.compile's (INFERENCE_MODES; "none" keeps the module eager), `decoder_mode` the decoder's.
    """
    fast_unet(_network(generator), mode, dtype)
    if teacher is not None:
        fast_teacher_decoder(teacher, dtype, decoder_mode or mode)
    return InAutocast(generator, dtype)


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
