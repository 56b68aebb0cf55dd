"""A guidance-scale embedding for `UNet2DModel` students: w -> sinusoidal(w - 1) -> zero-initialised linear map added
to the time embedding's input, the way diffusers' `TimestepEmbedding(cond_proj_dim=...)` adds `timestep_cond`.

Self-contained (imports only torch and diffusers): it ships as `guidance/guidance_embedding.py` in exports, a custom
component that `DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)` loads.
"""
from __future__ import annotations

import contextlib

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32,
                             scale: float = 1000.0) -> torch.Tensor:
    """(B,) -> (B, embedding_dim): [sin(s w f_k), cos(s w f_k)], f_k = 10000^(-k / (half - 1)), zero-padded to an
    odd dim; s = 1000 is VDM's embedding as diffusers' `StableDiffusionPipeline.get_guidance_scale_embedding`."""
    w = torch.as_tensor(w).reshape(-1) * scale
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step).to(w.device)
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 == 1 else emb


class GuidanceEmbedding(ModelMixin, ConfigMixin):
    """cond_proj(embedding(w - 1)), added to the input of a UNet's `time_embedding` (zero at initialisation).

    `scale` multiplies w - 1 inside the sinusoids. The default 1 keeps every feature smooth over a range of a few
    units of w (all frequencies <= 1), so what G learns at the w it was trained on carries to the w between them;
    diffusers' 1000 (which Stable Diffusion students must use, for the stock pipeline) makes most of 256 features
    oscillate many times over w in [1, 3].
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 256, time_channels: int = 32, scale: float = 1.0) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(embedding_dim, time_channels, bias=False)
        nn.init.zeros_(self.cond_proj.weight)

    def forward(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        emb = guidance_scale_embedding(guidance_scale - 1, self.config.embedding_dim, scale=self.config.scale)
        return self.cond_proj(emb.to(device=self.cond_proj.weight.device, dtype=self.cond_proj.weight.dtype))

    @contextlib.contextmanager
    def applied(self, unet: nn.Module, guidance_scale: torch.Tensor):
        """Within the block, `unet.time_embedding` receives its input plus this embedding of `guidance_scale`."""
        cond = self(guidance_scale)

        def add(_module, args):
            return (args[0] + cond.to(args[0].dtype).expand_as(args[0]), *args[1:])

        handle = unet.time_embedding.register_forward_pre_hook(add)
        try:
            yield
        finally:
            handle.remove()
