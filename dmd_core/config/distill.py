"""The distill section: DMD / DMD2 training, its GAN head and its phases."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator

from .base import _Model


class GANConfig(_Model):
    """DMD2 GAN head on the fake score's bottleneck features (DMD2 §4.2)."""

    enabled: bool = False
    weight_generator: float = Field(3e-3, ge=0)
    weight_discriminator: float = Field(1e-2, ge=0)
    r1_weight: float = Field(0.0, ge=0, description="gamma of the R1 penalty gamma/2 E||grad_x D(x)||^2 on real "
                             "latents (Mescheder et al. 2018, Eq. 9); 0 = off (DMD2 uses none)")
    r1: Literal["exact", "approximate"] = Field("approximate", description="exact: the input gradient (a double "
                                                "backward); approximate: ||D(x) - D(x + sigma eps)||^2 / sigma^2 "
                                                "(APT, Lin et al. 2025, Eq. 5), forwards only")
    r1_sigma: float = Field(0.01, gt=0, description="the approximate penalty's perturbation scale")

    omit_when = (("r1_weight", 0, ("r1_weight", "r1", "r1_sigma")),)


class _Overrides(_Model):
    """Settings a phase may change: an unknown key is named with the ones it may set."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        unknown = sorted(set(data) - set(cls.model_fields)) if isinstance(data, dict) else []
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}: a phase may set {', '.join(cls.model_fields)}")
        return data


class PhaseGANConfig(_Overrides):
    """The GAN settings a phase may change; those it leaves unset keep distill.gan's."""

    enabled: Optional[bool] = None
    weight_generator: Optional[float] = Field(None, ge=0)
    weight_discriminator: Optional[float] = Field(None, ge=0)
    r1_weight: Optional[float] = Field(None, ge=0)


class PhaseConfig(_Overrides):
    """One phase of a run: its length and the settings it changes (DMD2 §5: DM + TTUR first, then the GAN at a
    lower lr from those weights); unset settings keep the distill section's values."""

    steps: int = Field(gt=0, description="iterations of this phase; the phases' steps sum to distill.steps")
    lr: Optional[float] = Field(None, gt=0)
    lr_fake: Optional[float] = Field(None, gt=0, description="unset: distill.lr_fake, or when that is unset the "
                                                             "phase's lr")
    gan: Optional[PhaseGANConfig] = None
    lambda_reg: Optional[float] = Field(None, ge=0)
    dm_weight: Optional[float] = Field(None, ge=0)
    fake_updates_per_generator: Optional[int] = Field(None, ge=1, description="TTUR ratio, counted from the "
                                                                              "phase's first step")

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        """Only the settings the phase changes."""
        data = handler(self)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
            if isinstance(data.get("gan"), dict):
                data["gan"] = {k: v for k, v in data["gan"].items() if v is not None}
        return data

    def overrides(self, base: "DistillConfig") -> dict:
        """The fields of `base` this phase replaces, as `model_copy(update=...)` takes them."""
        out = {k: getattr(self, k) for k in PHASE_FIELDS if getattr(self, k) is not None}
        if self.gan is not None:
            out["gan"] = base.gan.model_copy(update=self.gan.model_dump(exclude_none=True))
        return out


PHASE_FIELDS = ("lr", "lr_fake", "lambda_reg", "dm_weight", "fake_updates_per_generator")  # and gan


class DistillConfig(_Model):
    """DMD / DMD2 training (DMD App. B: AdamW lr, wd 0.01, betas 0.9/0.999, clip 10, lambda_reg 0.25)."""

    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    reg_batch_size: Optional[int] = Field(None, gt=0, description="regression batch; default = batch_size")
    lr: float = Field(5e-5, gt=0, description="generator learning rate")
    lr_fake: Optional[float] = Field(None, gt=0, description="fake score learning rate; default = lr")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    generator_timesteps: list[int] = Field(default_factory=lambda: [999], min_length=1,
                                           description="(t*,) for one step; DMD2 4-step: 999,749,499,249")
    dm_t_min: float = Field(0.02, ge=0, le=1)
    dm_t_max: float = Field(0.98, ge=0, le=1)
    dm_time_shift: float = Field(1.0, gt=0, description="shift of the DM, fake-score and GAN training levels toward "
                                 "noise, s' = k s / (1 + (k - 1) s), on top of the teacher's own (a flow teacher's "
                                 "draws already carry its shift, as Decoupled-DMD's: Tongyi-MAI/Z-Image#78); shifting "
                                 "them further fixed SD3's 4-step artefacts (tianweiy/DMD2#62); 1 = none")
    dm_weighting: Literal["dmd", "sigma_over_alpha", "sigma3_over_alpha"] = "dmd"
    dm_weight: float = Field(1.0, ge=0)
    guidance: float = Field(1.0, ge=0, description="CFG scale of the real score")
    regression: Literal["lpips", "mse", "pseudo_huber", "none"] = "lpips"
    lambda_reg: float = Field(0.25, ge=0)
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_weights: Optional[str] = Field(None, description="local torchvision trunk weights (.pth) for LPIPS")
    lpips_random_trunk: bool = Field(False, description="tests only: random LPIPS trunk, no weights needed")
    pairs_in_memory_mb: float = Field(256, ge=0, description="pair sets up to this size (shard bytes) are read "
                                                             "into memory once; larger ones stream from the shards")
    fake_updates_per_generator: int = Field(1, ge=1, description="TTUR ratio (DMD2 uses 5)")
    gan: GANConfig = Field(default_factory=GANConfig)
    checkpoint_every: int = Field(250, gt=0)
    sample_every: int = Field(250, gt=0)
    log_every: int = Field(10, gt=0)
    max_consecutive_nonfinite: int = Field(10, gt=0)
    seed: int = 0
    bf16: bool = True
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (DMD App. B.3)")
    concat_regression: bool = Field(False, description="DMD Alg. 1 line 7: the regression outputs join the DM "
                                                       "and fake-score batch (one generator forward)")
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = Field(
        "auto", description="torch.compile mode of the three networks; auto: on CUDA, default once timed "
                        "eager steps show the steps left repay the compile time; none on CPU")
    compile_scope: Literal["auto", "model", "blocks", "attention"] = Field(
        "auto", description="what compile covers in G and the fake score: model (one graph each), blocks (each "
                            "transformer and resnet block; regional compilation), attention (each transformer "
                            "block only: far fewer variants to compile); auto = blocks with "
                            "gradient_checkpointing (attention for LoRA students), else model")
    channels_last: Optional[bool] = Field(None, description="NHWC activations and weights; default: on CUDA only, "
                                                            "and off for LoRA students")
    world_size: int = Field(1, ge=1, description="training processes (one GPU each) in all nodes; batch_size "
                                                 "and reg_batch_size are global: each rank takes 1/world_size")
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="with world_size > 1: ddp (DistributedDataParallel over generator and fake score) or "
                           "fsdp2 (full-weight students, EMA and the frozen teacher sharded per block over the ranks)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank of the students: G and the fake score are two adapters "
                                               "over one frozen base, the teacher (adapters off: the real score); "
                                               "0 = full-weight students")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA scale numerator (update = alpha / r B A); "
                                                                "default = lora_rank")
    lora_targets: Optional[list[str]] = Field(
        None, min_length=1, description="module-name suffixes (or regular expressions over full names) of the layers "
                                        "LoRA adapts; default: the backbone's attention, feed-forward, convolutions "
                                        "and time embedding")
    guidance_range: Optional[tuple[float, float]] = Field(
        None, description="[w_min, w_max]: one student for every guidance scale in the range (each sample draws "
                          "its own w; the real score runs CFG at it, G takes it as an input); None: fixed `guidance`")
    guidance_law: Literal["uniform", "log-uniform"] = Field("uniform", description="how w is drawn from the range")
    guidance_embedding_dim: int = Field(256, gt=1, description="sinusoidal embedding size of w fed to G "
                                                               "(time_cond_proj_dim for Stable Diffusion students)")
    regression_guidance: Literal["drawn", "pairs"] = Field(
        "drawn", description="the w a guided G takes for the regression loss: drawn from the range like the DM "
                             "samples' (a fixed-w student regresses its one w's outputs onto the pairs: this is that "
                             "at every w), or the pairs' own (pairs.guidance, or each pair's: pairs.guidance_scales)")
    guidance_lr_scale: float = Field(1.0, gt=0, description="learning-rate multiplier of the guidance embeddings' "
                                                            "projections (generator and fake score)")
    phases: Optional[list[PhaseConfig]] = Field(
        None, min_length=1, description="phases within one run, in order, each {steps, and the settings it changes: "
                                        "lr, lr_fake, gan, lambda_reg, dm_weight, fake_updates_per_generator}; their "
                                        "steps sum to `steps`; None: one phase of the settings above")
    on_new_pairs: Literal["restart", "continue"] = Field(
        "restart", description="when the pair set differs from the one the checkpoints trained on (regenerated "
                               "pairs): restart from step 0 (those checkpoints stay in place), or continue from "
                               "their latest weights with the pair stream from its start")

    @field_validator("guidance_range")
    @classmethod
    def _guidance_range(cls, v: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if v is not None and not 0 < v[0] < v[1]:
            raise ValueError("must be [w_min, w_max] with 0 < w_min < w_max, e.g. [1, 3]")
        return v

    omit_when = (("guidance_range", None, ("guidance_range", "guidance_law", "guidance_embedding_dim",
                                           "guidance_lr_scale", "regression_guidance")),
                 *((key, default, (key,)) for key, default in (
                     ("guidance_lr_scale", 1.0), ("phases", None), ("on_new_pairs", "restart"), ("dm_time_shift", 1.0),
                     ("lora_rank", 0), ("lora_alpha", None), ("lora_targets", None))))

    @field_validator("generator_timesteps")
    @classmethod
    def _decreasing(cls, v: list[int]) -> list[int]:
        if any(b >= a for a, b in zip(v, v[1:])) or v[-1] < 0:
            raise ValueError("must be non-negative and strictly decreasing, e.g. [999, 749, 499, 249]")
        return v

    @model_validator(mode="after")
    def _range(self) -> "DistillConfig":
        if self.dm_t_min >= self.dm_t_max:
            raise ValueError("dm_t_min must be below dm_t_max")
        return self

    @model_validator(mode="after")
    def _lora(self) -> "DistillConfig":
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ValueError("lora_alpha / lora_targets need lora_rank > 0")
        return self

    @model_validator(mode="after")
    def _fsdp2(self) -> "DistillConfig":
        if self.parallel == "fsdp2" and self.lora_rank:
            raise ValueError("parallel=fsdp2 shards full-weight students; LoRA students (lora_rank > 0) share one "
                             "base: use parallel=ddp")
        if self.parallel == "fsdp2" and self.gan_used:
            raise ValueError("parallel=fsdp2 with gan.enabled is not supported yet: use parallel=ddp")
        return self

    @field_validator("phases")
    @classmethod
    def _phases_cover_steps(cls, v: Optional[list[PhaseConfig]], info: ValidationInfo) -> Optional[list[PhaseConfig]]:
        steps = info.data.get("steps")
        if v and steps is not None and sum(p.steps for p in v) != steps:
            raise ValueError(f"the phases' steps sum to {sum(p.steps for p in v)} but distill.steps is {steps}: "
                             "make them equal (the last phase ends the run)")
        return v

    @property
    def gan_used(self) -> bool:
        """Whether any phase trains the GAN (the head and the real-image stream then exist from step 0)."""
        return any(self.phase_config(k).gan.enabled for k in range(len(self.phases or [None])))

    def phase_starts(self) -> list[int]:
        """The first step of each phase ([0] without phases)."""
        lengths = [p.steps for p in self.phases or []]
        return [sum(lengths[:k]) for k in range(len(lengths))] or [0]

    def phase_index(self, step: int) -> int:
        """The phase that runs iteration `step` (the last one past the end)."""
        return max(k for k, start in enumerate(self.phase_starts()) if start <= step)

    def phase_config(self, k: int) -> "DistillConfig":
        """This config with phase k's settings in place (and no phases); itself without phases."""
        if not self.phases:
            return self
        return self.model_copy(update={**self.phases[k].overrides(self), "phases": None})

    def generator_updates(self, step: int) -> int:
        """Generator updates in iterations [0, step): TTUR updates G at each phase's steps 0, r, 2r, ... (DMD2 §4.2)"""
        total = 0
        for k, start in enumerate(self.phase_starts()):
            length = self.phases[k].steps if self.phases else step
            r = self.phase_config(k).fake_updates_per_generator
            total += -(-min(max(step - start, 0), length) // r)
        return total

    def phases_begun(self, step: Optional[int] = None) -> list[dict]:
        """The phases that ran at least one iteration before `step` (None: all), each as its first step and the
        settings it changes (its length left out: lengthening a phase leaves its checkpoints valid)."""
        return [{"start": start, **p.model_dump(mode="json", exclude={"steps"})}
                for p, start in zip(self.phases or [], self.phase_starts()) if step is None or start < step]

    @model_validator(mode="after")
    def _split_by_rank(self) -> "DistillConfig":
        for name in ("batch_size", "reg_batch_size"):
            value = getattr(self, name)
            if value is not None and value % self.world_size:
                raise ValueError(f"{name}={value} is the global batch: it must be divisible by "
                                 f"world_size={self.world_size}")
        return self
