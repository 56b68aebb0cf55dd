"""Backbone adapters: how a network class is called, where its bottleneck is (the DMD2 GAN head's input), how it
takes a guidance scale and how it checkpoints its activations. Nothing outside this module touches a network's
attributes; a new network class (a transformer) adds one adapter here and one line in `BACKBONES`.

A condition is opaque to samplers and losses (k-diffusion's `extra_args`): None, a tensor of class ids, or a
dict of tensors passed as keyword arguments (`encoder_hidden_states`; SDXL's `added_cond_kwargs` nests a dict).
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .guidance_embedding import GuidanceEmbedding, guidance_scale_embedding

# LoRA targets (module-name suffixes): attention, feed-forward, convolutions and the time embedding.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2")
MMDIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                      "linear_1", "linear_2")


class Backbone:
    """The adapter of one network class; stateless (the network is passed in), so state_dicts stay the network's."""

    def matches(self, net: nn.Module) -> bool:
        raise NotImplementedError

    def __call__(self, net: nn.Module, x: torch.Tensor, c_noise: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network output (in its own parametrisation) at input x, noise input c_noise (B,), condition cond."""
        raise NotImplementedError

    def bottleneck(self, net: nn.Module) -> tuple[nn.Module, int]:
        """The module whose output feeds the GAN head, and its channels."""
        raise NotImplementedError

    def features(self, output: Any) -> torch.Tensor:
        """The bottleneck module's output as a (B, C, H, W) feature map."""
        return output[0] if isinstance(output, tuple) else output

    def randn_like(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Standard normal noise of x's shape, drawn in the layout the stock pipeline draws it."""
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    lora_targets: tuple[str, ...] = ()  # the layers a LoRA student adapts by default

    def checkpointing(self, net: nn.Module, context_fn: Optional[Callable] = None) -> None:
        """Recompute activations in backward (gradient checkpointing); `context_fn(block)` gives torch.utils.checkpoint's
        contexts for the block checkpointed (a LoRA base recomputes it under the adapter its forward ran with)."""
        if context_fn is None:
            net.enable_gradient_checkpointing()
            return

        def checkpoint(block, *args, **kwargs):  # diffusers passes the block module first
            block_ctx = partial(context_fn, block if isinstance(block, nn.Module) else None)
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, context_fn=block_ctx, **kwargs)

        net.enable_gradient_checkpointing(checkpoint)

    def guided(self, net: nn.Module, embedding_dim: int) -> nn.Module:
        """A copy of `net` that also takes a guidance scale w, equal to `net` at initialisation."""
        raise NotImplementedError

    def guidance_cond(self, net: nn.Module, cond: Any, w: torch.Tensor) -> Any:
        """The condition of a guided network: `cond` plus the guidance scales w (B,)."""
        raise NotImplementedError


class GuidedUNet2D(nn.Module):
    """A `UNet2DModel` that also takes `guidance_scale` (B,), embedded and added to its time embedding's input."""

    def __init__(self, unet: nn.Module, guidance: GuidanceEmbedding) -> None:
        super().__init__()
        self.unet, self.guidance = unet, guidance

    @property
    def config(self):
        return self.unet.config

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Optional[Callable] = None) -> None:
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                guidance_scale: Optional[torch.Tensor] = None):
        if guidance_scale is None:
            return self.unet(sample, timestep, class_labels=class_labels)
        with self.guidance.applied(self.unet, guidance_scale):
            return self.unet(sample, timestep, class_labels=class_labels)


class UNet2D(Backbone):
    """diffusers `UNet2DModel` (pixel teachers; class ids as `class_labels`), also inside a `GuidedUNet2D`."""

    lora_targets = UNET_LORA_TARGETS

    def matches(self, net):
        from diffusers import UNet2DModel

        return isinstance(net, (UNet2DModel, GuidedUNet2D))

    def __call__(self, net, x, c_noise, cond):
        if cond is None:
            return net(x, c_noise).sample
        if isinstance(cond, dict):
            return net(x, c_noise, **cond).sample
        return net(x, c_noise, class_labels=cond).sample

    def bottleneck(self, net):
        inner = net.unet if isinstance(net, GuidedUNet2D) else net
        return inner.mid_block, int(inner.config.block_out_channels[-1])

    def guided(self, net, embedding_dim):
        channels = net.time_embedding.linear_1.in_features
        guidance = GuidanceEmbedding(embedding_dim, channels).to(next(net.parameters()).device)
        return GuidedUNet2D(copy.deepcopy(net), guidance)

    def guidance_cond(self, net, cond, w):
        out = {"guidance_scale": w}
        if isinstance(cond, dict):
            return {**cond, **out}
        return out if cond is None else {"class_labels": cond, **out}


class UNet2DCondition(Backbone):
    """diffusers `UNet2DConditionModel` (SD, SDXL): the condition dict is its keyword arguments; a guided copy sets
    `time_cond_proj_dim` and takes `timestep_cond` = embedding(w - 1), as the stock pipelines compute it."""

    lora_targets = UNET_LORA_TARGETS

    def matches(self, net):
        from diffusers import UNet2DConditionModel

        return isinstance(net, UNet2DConditionModel)

    def __call__(self, net, x, c_noise, cond):
        return net(x, c_noise, **(cond or {})).sample

    def bottleneck(self, net):
        return net.mid_block, int(net.config.block_out_channels[-1])

    def guided(self, net, embedding_dim):
        from diffusers import UNet2DConditionModel

        student = UNet2DConditionModel.from_config({**net.config, "time_cond_proj_dim": embedding_dim})
        missing, unexpected = student.load_state_dict(net.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"guided student: unexpected weight layout (missing {missing}, unexpected {unexpected})")
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
        return student.to(next(net.parameters()).device)

    def guidance_cond(self, net, cond, w):
        emb = guidance_scale_embedding(w.float() - 1, net.config.time_cond_proj_dim).to(w.device)
        return {**(cond or {}), "timestep_cond": emb}


class SD3Transformer(Backbone):
    """diffusers `SD3Transformer2DModel` (MMDiT): the condition dict holds `encoder_hidden_states` (CLIP states padded
    to the T5 width, then T5's, on the sequence axis) and `pooled_projections`; the time input is 1000 sigma. The
    GAN head reads the image tokens after the middle joint block, as a (B, D, H/p, W/p) map."""

    lora_targets = MMDIT_LORA_TARGETS

    def matches(self, net):
        from diffusers import SD3Transformer2DModel

        return isinstance(net, SD3Transformer2DModel)

    def __call__(self, net, x, c_noise, cond):
        return net(hidden_states=x, timestep=c_noise, **(cond or {})).sample

    def bottleneck(self, net):
        return net.transformer_blocks[len(net.transformer_blocks) // 2], int(net.inner_dim)

    def features(self, output):
        tokens = output[1]  # JointTransformerBlock returns (text tokens, image tokens)
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, tokens.shape[1] // side)

    def guided(self, net, embedding_dim):
        raise NotImplementedError("guided students (distill.guidance_range) of SD3 transformers are not supported")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 W/2, 4C): Flux's 2 x 2 patches (FluxPipeline._pack_latents)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of `pack_latents` (FluxPipeline._unpack_latents)."""
    B, _, D = tokens.shape
    return tokens.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def image_ids(H: int, W: int, like: torch.Tensor) -> torch.Tensor:
    """(row, column) position ids of the packed tokens, (H/2 W/2, 3) (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(H // 2, W // 2, 3)
    ids[..., 1] += torch.arange(H // 2)[:, None]
    ids[..., 2] += torch.arange(W // 2)[None, :]
    return ids.reshape(-1, 3).to(device=like.device, dtype=like.dtype)


class FluxTransformer(Backbone):
    """diffusers `FluxTransformer2DModel`: the model space is the unpacked latent (B, C, H, W); the call packs it into
    2 x 2 tokens with their position ids (text ids zero), and unpacks the velocity. The condition dict holds
    `encoder_hidden_states` (T5), `pooled_projections` (CLIP) and, for a guidance-distilled model (FLUX.1-dev),
    `guidance` (B,). The time input is sigma (the model scales it by 1000). GAN features: the image tokens after
    the middle double-stream block."""

    lora_targets = MMDIT_LORA_TARGETS

    def matches(self, net):
        from diffusers import FluxTransformer2DModel

        return isinstance(net, FluxTransformer2DModel)

    def __call__(self, net, x, c_noise, cond):
        cond = dict(cond or {})
        H, W = x.shape[-2:]
        text = cond["encoder_hidden_states"]
        out = net(hidden_states=pack_latents(x), timestep=c_noise.to(x.dtype), img_ids=image_ids(H, W, x),
                  txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype), **cond).sample
        return unpack_latents(out, H, W)

    def bottleneck(self, net):
        return net.transformer_blocks[len(net.transformer_blocks) // 2], int(net.inner_dim)

    def features(self, output):
        return SD3Transformer.features(self, output)

    def randn_like(self, x, generator):
        """FluxPipeline's scheduler draws its re-noising in the packed layout."""
        packed = torch.randn(pack_latents(x).shape, generator=generator, device=x.device, dtype=x.dtype)
        return unpack_latents(packed, *x.shape[-2:])

    def guided(self, net, embedding_dim):
        raise NotImplementedError("distill.guidance_range with Flux: a guidance-distilled Flux takes w as an input "
                                  "already (distill.guidance sets it)")


BACKBONES: list[Backbone] = [UNet2D(), UNet2DCondition(), SD3Transformer(), FluxTransformer()]


def backbone_for(net: nn.Module) -> Backbone:
    """The adapter of `net`'s class; TypeError names the class when none matches."""
    net = getattr(net, "_orig_mod", net)  # torch.compile'd
    for backbone in BACKBONES:
        if backbone.matches(net):
            return backbone
    raise TypeError(f"no backbone adapter for {type(net).__name__}: add one to dmd_core.backbones.BACKBONES")
