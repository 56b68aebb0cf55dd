"""One object per loaded teacher: denoiser, noise process, sample shape, conditions, latent codec (DMD §3.1).

What differs between teacher families (loading, folder checks, condition encoding and the null condition, the latent
codec, exports) lives in the family (`dmd_core.families`); a `Teacher` holds its parts and asks its family.
`callable` teachers come from a user factory "module:function" returning a `Teacher`.
"""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .conditions import ClassLabels, Conditions, Prompts, RawConditions
from .denoisers import Cond, NetDenoiser, with_guidance
from .families import FAMILIES, KINDS, family as family_of  # noqa: F401  KINDS: importable from here too
from .processes import NoiseProcess, VPDiscrete
from .samplers import pndm_grid, pndm_sample, sample
from .teacher_files import TeacherLoadError, check_teacher_folder  # noqa: F401  importable from here too


@dataclass(eq=False)
class LatentCodec:
    """Model space <-> VAE latents: x = (vae_latent - shift) * scale; `decoder` (e.g. TAESD) decodes for the
    regression loss when given (DMD App. B.3)."""

    vae: nn.Module
    scale: float
    shift: float = 0.0
    decoder: Optional[nn.Module] = None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE."""
        return self.vae.decode(x / self.scale + self.shift).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model space: the mode of the VAE posterior, shifted and scaled (deterministic)."""
        return (self.vae.encode(images).latent_dist.mode() - self.shift) * self.scale

    @property
    def factor(self) -> int:
        """Pixels per latent cell along each side (8 for the Stable Diffusion VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode_for_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Decode with grad: the smaller decoder when given, else the VAE."""
        if self.decoder is None:
            return self.decode(x)
        return self.decoder.decode(x / self.decoder.config.scaling_factor).sample

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.decoder) if m is not None]


@dataclass(eq=False)
class Teacher:
    """What every stage needs from a teacher. `decode` maps model-space samples to images in [-1, 1]."""

    kind: str
    denoiser: nn.Module
    process: NoiseProcess
    sample_shape: tuple[int, ...]
    prediction_type: str
    num_classes: int = 0
    encoders: dict[str, nn.Module] = field(default_factory=dict)  # text encoders, by component name
    tokenizers: dict[str, Any] = field(default_factory=dict)
    codec: Optional[LatentCodec] = None
    scheduler_config: dict = field(default_factory=dict)
    pipeline_config: dict = field(default_factory=dict)  # model_index.json keys the family reads
    _null: Cond = None

    @property
    def family(self):
        return family_of(self.kind)

    @property
    def conditioning(self) -> str:
        """'text', 'class' or 'none'."""
        return "text" if self.tokenizers else ("class" if self.num_classes else "none")

    @property
    def net(self) -> nn.Module:
        """The teacher's network (inside its denoiser)."""
        return getattr(self.denoiser, "net", self.denoiser)

    @property
    def vae(self) -> Optional[nn.Module]:
        """The latent codec's VAE (None for pixel teachers)."""
        return None if self.codec is None else self.codec.vae

    @property
    def text_encoder(self) -> Optional[nn.Module]:
        return self.encoders.get("text_encoder")

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers.get("tokenizer")

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def modules(self) -> list[nn.Module]:
        return [self.denoiser, *self.encoders.values(), *(self.codec.modules() if self.codec else [])]

    def conditions(self, prompts: Optional[list[str]] = None) -> Optional[Conditions]:
        """The condition source for this teacher: class ids, the given prompts, or None."""
        if self.conditioning == "text":
            if not prompts:
                raise ValueError("a text-to-image teacher needs prompts (data.captions)")
            return Prompts(prompts)
        return ClassLabels(self.num_classes) if self.num_classes else None

    @torch.no_grad()
    def encode(self, raw: RawConditions) -> Cond:
        """Raw conditions -> the network's condition: class ids pass through; prompts go through the family's text
        encoders (in their own precision, also inside an autocast region, as pair generation encodes)."""
        if raw is None or self.conditioning != "text":
            return None if raw is None else torch.as_tensor(raw, device=self.device).long()
        device = next(iter(self.encoders.values())).device
        with torch.autocast(device.type, enabled=False):
            return self.family.encode(self, list(raw))

    @property
    def embedded_guidance(self) -> bool:
        """The network takes the guidance scale as an input (FLUX.1-dev) instead of running CFG."""
        return self.kind in FAMILIES and self.family.embedded_guidance(self)

    def with_guidance_input(self, cond: Cond, w: float) -> Cond:
        """`cond` plus the guidance scale w as the network's `guidance` input (B,), for embedded-guidance teachers."""
        like = cond["encoder_hidden_states"]
        return {**cond, "guidance": torch.full((like.shape[0],), float(w), device=like.device, dtype=torch.float32)}

    def encode_guided(self, raw: RawConditions, w: float) -> Cond:
        """Raw conditions -> the condition at guidance w (embedded-guidance teachers)."""
        return self.with_guidance_input(self.encode(raw), w)

    @property
    def null_cond(self) -> Cond:
        """The unconditional input for classifier-free guidance, with batch 1 (the empty prompt's encoding)."""
        if self.conditioning == "class":
            return torch.tensor([self.num_classes], device=self.device)
        if self.conditioning == "text":
            device = next(iter(self.encoders.values())).device
            if self._null is None or _device_of(self._null) != device:
                self._null = self.family.null_cond(self)
            return self._null
        return None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]: identity for pixel teachers, the VAE decode for latent ones."""
        return x if self.codec is None else self.codec.decode(x)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) -> model space: identity for pixel teachers, the VAE for latent ones."""
        return images if self.codec is None else self.codec.encode(images)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, side) of the images the teacher's samples decode to."""
        if self.codec is None:
            return self.sample_shape[0], self.sample_shape[-1]
        return 3, self.sample_shape[-1] * self.codec.factor

    def decode_for_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Decode for the regression loss (with grad): the smaller decoder when given (DMD App. B.3), else `decode`."""
        return x if self.codec is None else self.codec.decode_for_loss(x)

    def to(self, device: torch.device | str) -> "Teacher":
        for module in self.modules():
            module.to(device)
        self._null = None
        return self

    def frozen(self) -> "Teacher":
        """Eval mode, no parameter gradients (gradients still flow to inputs, e.g. through the decoder)."""
        for module in self.modules():
            module.eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def sample(self, solver: str, steps: int, z: torch.Tensor, cond: Cond = None, guidance: float = 1.0) -> torch.Tensor:
        """The teacher's deterministic ODE solution from noise z (model space), with CFG at `guidance`."""
        if self.embedded_guidance:  # the network takes w; no CFG
            D, cond = self.denoiser, self.with_guidance_input(cond, guidance)
        else:
            D = with_guidance(self.denoiser, guidance, self.null_cond)
        if solver == "pndm":  # diffusers' PNDM grid and end point, as the teacher's scheduler config sets them
            grid = pndm_grid(self.process.T, steps, int(self.scheduler_config.get("steps_offset", 0)))
            return pndm_sample(D, z, self.process.levels(grid), self.process, cond,
                               set_alpha_to_one=bool(self.scheduler_config.get("set_alpha_to_one", False)))
        return sample(solver, D, z, self.process.grid(steps), self.process, cond)

    def student_net(self) -> nn.Module:
        """A trainable copy of the teacher's network (the generator and fake score start from it, DMD Alg. 1)."""
        return copy.deepcopy(self.net).requires_grad_(True).train()

    def student(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A frozen copy of the teacher's denoiser holding a checkpoint's generator weights (its state dict)."""
        denoiser = copy.deepcopy(self.denoiser)
        denoiser.load_state_dict(weights)
        return denoiser.eval().requires_grad_(False)


def _device_of(cond: Cond) -> Optional[torch.device]:
    if isinstance(cond, dict):
        return _device_of(next(iter(cond.values())))
    return cond.device if isinstance(cond, torch.Tensor) else None


def ddpm_scheduler(scheduler_config: dict):
    """A DDPMScheduler with the betas of any DDPM-family scheduler config (other classes' keys are dropped)."""
    from diffusers import DDPMScheduler

    keys = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler(**{k: v for k, v in scheduler_config.items() if k in keys})


def vp_process(scheduler_config: dict) -> VPDiscrete:
    """alphas_cumprod of any diffusers DDPM-family scheduler config (linear, scaled_linear, cosine betas...)."""
    return VPDiscrete.from_scheduler(ddpm_scheduler(scheduler_config))


def network_teacher(kind: str, net: nn.Module, process: NoiseProcess, prediction_type: str, **parts: Any) -> Teacher:
    """A frozen teacher of family `kind` over `net`, its sample shape read from the network's config."""
    size = net.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(net.config.in_channels), int(h), int(w))
    return Teacher(kind, NetDenoiser(net, process, prediction_type), process, shape, prediction_type,
                   **parts).frozen()


def load_callable(path: Optional[str], factory: Optional[str] = None, **kwargs: Any) -> Teacher:
    """A user factory "package.module:function" called as function(path, **kwargs) -> Teacher."""
    if not factory or ":" not in factory:
        raise ValueError(f"teacher.factory must be 'package.module:function', got {factory!r}")
    module_name, fn_name = factory.split(":", 1)
    try:
        fn: Callable = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"teacher.factory {factory!r} cannot be imported: {err}") from None
    teacher = fn(path, **kwargs)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"teacher.factory {factory!r} returned {type(teacher).__name__}, not a dmd_core Teacher")
    return teacher


def load_teacher(kind: str, path: Optional[str], **options: Any) -> Teacher:
    """Load a teacher of `kind` (a registered family, or callable) from a local folder."""
    if kind == "callable":
        return load_callable(path, **options)
    if kind not in KINDS:
        raise ValueError(f"teacher.kind must be one of {KINDS}, got {kind!r}")
    check_teacher_folder(kind, path)
    return family_of(kind).load(path, **options)
