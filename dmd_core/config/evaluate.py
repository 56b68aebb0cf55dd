"""The export and evaluate sections."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from .base import GuidanceScales, _Model


class ExportConfig(_Model):
    """The exported one-step pipeline."""

    use_ema: bool = True
    check_atol: float = Field(1e-5, gt=0, description="max |export - trainer| on fixed noise")


class EvaluateConfig(_Model):
    """Evaluation protocol: `digits` (FD in a digits classifier's features), or clean-fid FID (+ CLIP score for
    text) at the papers' protocols `coco30k`, `coco10k`, `cifar10-50k`. None: digits for data.name=digits."""

    protocol: Optional[str] = Field(None, description="a name in dmd_core.protocols.PROTOCOLS")
    n_samples: Optional[int] = Field(None, gt=1, description="samples per model; default the protocol's "
                                                               "(30,000 for coco30k, 1,797 for digits)")
    teacher_steps: int = Field(50, gt=0)
    batch_size: int = Field(512, gt=0)
    classifier_epochs: int = Field(30, gt=0)
    seed: int = 1234
    captions: Optional[str] = Field(None, description="COCO captions json (captions_val2014.json), any fsspec URL")
    reference_images: Optional[str] = Field(None, description="folder of reference images (COCO val2014, a "
                                                              "CIFAR-10 train folder), any fsspec URL")
    inception_weights: Optional[str] = Field(None, description="clean-fid's Inception TorchScript file "
                                                               "(inception-2015-12-05.pt), local path or URL")
    fid_mode: Literal["clean", "legacy_tensorflow"] = "clean"
    clip_model: str = "ViT-g-14"
    clip_weights: Optional[str] = Field(None, description="OpenCLIP weights of clip_model (laion2b_s12b_b42k), "
                                                          "local path or URL")
    clip_prefix: str = Field("", description='"A photo depicts " reproduces the official DMD2 evaluator')
    clip_resize: Optional[int] = Field(None, description="resize before CLIP's preprocess (DMD2: 256)")
    random_extractors: bool = Field(False, description="tests only: random-init Inception-shaped and CLIP "
                                                       "extractors, no weights needed (numbers mean nothing)")
    guidance_sweep: Optional[GuidanceScales] = Field(None, min_length=1, description="guidance scales at which "
                                                  "the teacher and the student are scored (eval/guidance.parquet)")
    fast: Optional[bool] = Field(
        None, description="CUDA: students generated through dmd_core.inference's fast path (weights in the "
                          "autocast dtype, NHWC, fused QKV, compiled UNet and decoder) and batches of one shape; "
                          "None (auto) = from 2,000 samples, where its ~1 min of compilation pays off")
    clip_precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="CLIP image/text towers' precision: fp32 is the metric's definition (DMD2's evaluator); "
                            "tf32 is ~4x faster on GPUs and moves the score by ~1e-5 (docs/benchmarks.md); fp16 "
                            "autocast keeps tf32's mantissa at half-precision speed; bf16 moves it by ~1e-4")
    workers: int = Field(0, ge=0, description="threads for the per-image resizes (PIL); 0 = one per core")
    world_size: int = Field(1, ge=1, description="data-parallel evaluation: torchrun ranks on this host (one GPU "
                                                 "each) sharing the samples; the results equal one process's")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast of the evaluated models' generation (and VAE decode); the feature "
                            "extractors keep their own precision; auto = bf16 on CUDA, fp32 on CPU (in each row)")

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from ..protocols import PROTOCOLS

            if v not in PROTOCOLS:
                raise ValueError(f"unknown evaluation protocol {v!r}; use one of {', '.join(sorted(PROTOCOLS))}")
        return v

    omit_when = tuple((key, default, (key,)) for key, default in (
        ("guidance_sweep", None), ("precision", "auto"), ("world_size", 1), ("fast", None), ("clip_precision", "fp32"),
        ("workers", 0)))
