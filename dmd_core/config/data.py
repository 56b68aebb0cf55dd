"""The data, teacher and pairs sections."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import GuidanceScales, _Model


class RealDataConfig(_Model):
    """Real images for DMD2's GAN (DMD2 §4.2): read by the `real` stage (`storage.real_images`)."""

    url: str = Field(..., min_length=1, description="WebDataset tars (img2dataset layout), a folder of images with "
                                                    "optional .txt captions, or parquet files, on any fsspec URL")
    format: Optional[Literal["webdataset", "folder", "parquet"]] = Field(None, description="default: detected")
    n: Optional[int] = Field(None, gt=0, description="use the first n readable images; default all")
    shard_size: int = Field(256, gt=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="fail when more of the images are unreadable")


class DataConfig(_Model):
    """The data: a named dataset (`digits` is sklearn's 8x8 digits, embedded) and the prompts of text models."""

    name: Literal["digits", "none"] = "digits"
    image_size: int = Field(8, gt=0, description="pixel teachers trained here; loaded teachers define their own")
    channels: int = Field(1, gt=0)
    num_classes: int = Field(10, ge=0, description="0 for unconditional models")
    captions: Optional[str] = Field(None, description="prompts for text-to-image teachers: a COCO captions json, "
                                                      ".txt (one a line), .parquet or .csv on any fsspec URL")
    caption_column: Optional[str] = Field(None, description="column of a .parquet/.csv caption file")
    real: Optional[RealDataConfig] = Field(None, description="real images for the GAN (the `real` stage)")

    omit_when = (("real", None, ("real",)),)


class TeacherConfig(_Model):
    """The teacher: `kind` picks the loader; `source` says whether it is trained here (digits) or a local folder."""

    kind: str = Field("unet2d", description="the teacher family (dmd_core.families): unet2d (UNet2DModel + "
                                            "scheduler), sd (Stable Diffusion folder), sdxl (Stable Diffusion XL "
                                            "folder); or callable (teacher.factory)")
    source: Literal["train", "path"] = "train"
    path: Optional[str] = Field(None, description="local diffusers folder when source=path")
    factory: Optional[str] = Field(None, description="'package.module:function' returning a Teacher (kind=callable)")
    decoder_path: Optional[str] = Field(None, description="optional AutoencoderTiny folder decoding latents for the "
                                                          "regression loss (DMD App. B.3)")
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample", "flow_prediction"]] = Field(
        None, description="default: the scheduler config's (epsilon when training here)")
    num_train_timesteps: int = Field(1000, gt=1)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(2e-2, gt=0, lt=1)
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    layers_per_block: int = Field(2, gt=0)
    train_steps: int = Field(2000, ge=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    class_dropout: float = Field(0.1, ge=0, lt=1, description="label dropout enabling classifier-free guidance")
    seed: int = 0

    @field_validator("kind")
    @classmethod
    def _registered(cls, v: str) -> str:
        from ..families import KINDS

        if v not in KINDS:
            raise ValueError(f"must be one of {', '.join(KINDS)}")
        return v

    @property
    def text(self) -> bool:
        """A text-to-image family (its conditions are prompts)."""
        from ..families import FAMILIES, family

        return self.kind in FAMILIES and family(self.kind).conditioning == "text"

    @property
    def flow(self) -> bool:
        """A rectified-flow family: timestep T (sigma 1) is a valid step; VP-only solvers do not apply."""
        from ..families import FAMILIES, family

        return self.kind in FAMILIES and family(self.kind).flow

    @model_validator(mode="after")
    def _path_needed(self) -> "TeacherConfig":
        if self.kind == "callable" and not self.factory:
            raise ValueError("teacher.factory is required when teacher.kind is 'callable'")
        if self.kind != "callable" and self.source == "path" and not self.path:
            raise ValueError("teacher.path is required when teacher.source is 'path'")
        if self.kind not in ("unet2d", "callable") and self.source == "train":
            raise ValueError(f"teacher.kind={self.kind} loads a folder: set teacher.source=path and teacher.path")
        return self


class PairsConfig(_Model):
    """Noise-image pairs from the teacher's deterministic ODE solver (DMD §3.3)."""

    n: int = Field(2048, gt=0)
    shard_size: int = Field(512, gt=0)
    solver: Literal["ddim", "euler", "heun", "pndm"] = "ddim"
    steps: int = Field(50, gt=0)
    guidance: float = Field(1.0, ge=0)
    guidance_scales: Optional[GuidanceScales] = Field(
        None, min_length=1, description="pairs at several CFG scales, for students over distill.guidance_range: pair "
                                        "i is made at guidance_scales[i % len], its json records it and the student "
                                        "regresses onto it at that w; None: every pair at `guidance`")
    batch_size: int = Field(256, gt=0)
    dtype: Literal["float32", "float16"] = Field("float32", description="of the stored noise and outputs")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast of the teacher's solver; auto = bf16 on CUDA, fp32 on CPU (kept in the manifest)")

    omit_when = (("guidance_scales", None, ("guidance_scales",)),)

    def scale_of(self, index: int) -> float:
        """The CFG scale at which pair `index` is made."""
        return float(self.guidance if self.guidance_scales is None else
                     self.guidance_scales[index % len(self.guidance_scales)])
