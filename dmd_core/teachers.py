"""One object per loaded teacher: denoiser, schedule, sample shape, condition encoder, decoder (DMD §3.1).

Loaders, one per kind, each from a local diffusers folder (no download, safetensors only):
`unet2d` (UNet2DModel + scheduler; unconditional or class-conditional), `sd` (the Stable Diffusion layout:
UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, AutoencoderKL, scheduler), and `callable` (a user
factory "module:function" returning a `Teacher`).
"""
from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .conditions import ClassLabels, Conditions, Prompts, RawConditions
from .denoisers import PREDICTION_TYPES, Cond, UNetDenoiser, with_guidance
from .samplers import pndm_grid, pndm_sample, sample
from .schedules import NoiseSchedule, VPSchedule, timestep_grid
from .teacher_files import (TeacherLoadError, check_sd,  # noqa: F401  TeacherLoadError: importable from here too
                            check_teacher_folder, check_unet2d, read_scheduler, require,
                            require_weights)

KINDS = ("unet2d", "sd", "callable")


@dataclass(eq=False)
class Teacher:
    """What every stage needs from a teacher. `decode` maps model-space samples to images in [-1, 1]."""

    kind: str
    denoiser: nn.Module
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    prediction_type: str
    num_classes: int = 0
    text_encoder: Optional[nn.Module] = None
    tokenizer: Any = None
    vae: Optional[nn.Module] = None
    decoder: Optional[nn.Module] = None
    scheduler_config: dict = field(default_factory=dict)
    _null: Cond = None

    @property
    def conditioning(self) -> str:
        """'text', 'class' or 'none'."""
        return "text" if self.text_encoder is not None else ("class" if self.num_classes else "none")

    @property
    def unet(self) -> nn.Module:
        return getattr(self.denoiser, "unet", self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def conditions(self, prompts: Optional[list[str]] = None) -> Optional[Conditions]:
        """The condition source for this teacher: class ids, the given prompts, or None."""
        if self.conditioning == "text":
            if not prompts:
                raise ValueError("a text-to-image teacher needs prompts (data.captions)")
            return Prompts(prompts)
        return ClassLabels(self.num_classes) if self.num_classes else None

    @torch.no_grad()
    def encode(self, raw: RawConditions) -> Cond:
        """Raw conditions -> the network's condition: class ids pass through; prompts -> CLIP hidden states
        (in the text encoder's own precision, also inside an autocast region, as pair generation encodes)."""
        if raw is None or self.conditioning != "text":
            return None if raw is None else torch.as_tensor(raw, device=self.device).long()
        ids = self.tokenizer(list(raw), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        # As StableDiffusionPipeline.encode_prompt: last hidden state, no attention mask for CLIP.
        with torch.autocast(self.text_encoder.device.type, enabled=False):
            return {"encoder_hidden_states": self.text_encoder(ids.to(self.text_encoder.device))[0]}

    @property
    def null_cond(self) -> Cond:
        """The unconditional input for classifier-free guidance, with batch 1."""
        if self.conditioning == "class":
            return torch.tensor([self.num_classes], device=self.device)
        if self.conditioning == "text":
            if self._null is None or self._null["encoder_hidden_states"].device != self.text_encoder.device:
                self._null = self.encode([""])
            return self._null
        return None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1]: identity for pixel teachers, the VAE decode for latent ones."""
        return x if self.vae is None else self.vae.decode(x / self.vae.config.scaling_factor).sample

    def decode_for_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Decode for the regression loss (with grad): the smaller `decoder` when given (DMD App. B.3), else `decode`."""
        dec = self.decoder if self.decoder is not None else self.vae
        return x if dec is None else dec.decode(x / dec.config.scaling_factor).sample

    def to(self, device: torch.device | str) -> "Teacher":
        for module in (self.denoiser, self.text_encoder, self.vae, self.decoder):
            if module is not None:
                module.to(device)
        self._null = None
        return self

    def frozen(self) -> "Teacher":
        """Eval mode, no parameter gradients (gradients still flow to inputs, e.g. through the decoder)."""
        for module in (self.denoiser, self.text_encoder, self.vae, self.decoder):
            if module is not None:
                module.eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def sample(self, solver: str, steps: int, z: torch.Tensor, cond: Cond = None, guidance: float = 1.0) -> torch.Tensor:
        """The teacher's deterministic ODE solution from noise z (model space), with CFG at `guidance`."""
        D = with_guidance(self.denoiser, guidance, self.null_cond)
        if solver == "pndm":  # diffusers' PNDM grid and end point, as the teacher's scheduler config sets them
            grid = pndm_grid(self.schedule.T, steps, int(self.scheduler_config.get("steps_offset", 0)))
            return pndm_sample(D, z, grid, self.schedule, cond,
                               set_alpha_to_one=bool(self.scheduler_config.get("set_alpha_to_one", False)))
        return sample(solver, D, z, timestep_grid(self.schedule.T, steps), self.schedule, cond)

    def student_unet(self) -> nn.Module:
        """A trainable copy of the teacher's network (the generator and fake score start from it, DMD Alg. 1)."""
        return copy.deepcopy(self.unet).requires_grad_(True).train()

    def student(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """A frozen copy of the teacher's denoiser holding a checkpoint's generator weights (its state dict)."""
        denoiser = copy.deepcopy(self.denoiser)
        denoiser.load_state_dict(weights)
        return denoiser.eval().requires_grad_(False)


def ddpm_scheduler(scheduler_config: dict):
    """A DDPMScheduler with the betas of any DDPM-family scheduler config (other classes' keys are dropped)."""
    from diffusers import DDPMScheduler

    keys = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler(**{k: v for k, v in scheduler_config.items() if k in keys})


def vp_schedule(scheduler_config: dict) -> VPSchedule:
    """alphas_cumprod of any diffusers DDPM-family scheduler config (linear, scaled_linear, cosine betas...)."""
    return VPSchedule.from_scheduler(ddpm_scheduler(scheduler_config))


def _prediction_type(scheduler_config: dict, override: Optional[str]) -> str:
    kind = override or scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"teacher.prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
    return kind


def _shape(config) -> tuple[int, int, int]:
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.in_channels), int(h), int(w)


def load_unet2d(path: str | Path, prediction_type: Optional[str] = None, **_: Any) -> Teacher:
    """A `UNet2DModel` teacher: `unet/` + `scheduler/` subfolders, or a flat folder (google/ddpm-cifar10-32).

    Class-conditional models carry one extra class embedding, the null class used for guidance.
    """
    from diffusers import UNet2DModel

    root = Path(path)
    unet_dir, sched_dir = check_unet2d(root)
    config = read_scheduler(sched_dir)
    # low_cpu_mem_usage=False: accelerate's empty-weights init patches nn.Module globally (not thread-safe).
    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, use_safetensors=True)
    kind = _prediction_type(config, prediction_type)
    schedule = vp_schedule(config)
    classes = int(unet.config.num_class_embeds or 0)
    return Teacher("unet2d", UNetDenoiser(unet, schedule, kind), schedule, _shape(unet.config), kind,
                   num_classes=max(classes - 1, 0), scheduler_config=config).frozen()


def load_sd(path: str | Path, prediction_type: Optional[str] = None, decoder_path: Optional[str] = None,
            **_: Any) -> Teacher:
    """A Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), eps- or v-prediction.

    `decoder_path`: an optional smaller decoder folder (diffusers `AutoencoderTiny`, e.g. TAESD) used
    instead of the VAE to decode for the regression loss (DMD App. B.3).
    """
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    check_sd(root)
    config = read_scheduler(root / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", low_cpu_mem_usage=False, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(root / "vae", low_cpu_mem_usage=False, use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    decoder = None
    if decoder_path:
        dec = Path(decoder_path)
        require(dec / "config.json")
        require_weights(dec)
        decoder = AutoencoderTiny.from_pretrained(dec, low_cpu_mem_usage=False, use_safetensors=True)
    kind = _prediction_type(config, prediction_type)
    schedule = vp_schedule(config)
    return Teacher("sd", UNetDenoiser(unet, schedule, kind), schedule, _shape(unet.config), kind,
                   text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, decoder=decoder,
                   scheduler_config=config).frozen()


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


LOADERS: dict[str, Callable[..., Teacher]] = {"unet2d": load_unet2d, "sd": load_sd, "callable": load_callable}


def load_teacher(kind: str, path: Optional[str | Path], **options: Any) -> Teacher:
    """Load a teacher of `kind` from a local folder."""
    if kind not in LOADERS:
        raise ValueError(f"teacher.kind must be one of {KINDS}, got {kind!r}")
    if kind != "callable":
        check_teacher_folder(kind, path)
    return LOADERS[kind](path, **options)
