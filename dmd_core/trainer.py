"""DMD / DMD2 trainer step engine: generator, frozen real score, trained fake score, optional GAN head."""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import accel
from .adapters import Students, lora_students, student_lora_targets
from .conditions import ClassLabels, Conditions
from .config import DistillConfig
from .denoisers import PREDICTION_TYPES, CFGDenoiser, Cond, NetDenoiser, cond_cat, with_guidance
from .gan import BottleneckFeatures, GANHead
from .generator import Generator
from .draws import Collective, Draws
from .guidance import guided_roles, student_cond
from .losses import (approximate_r1_penalty, denoising_loss, dm_loss, gan_discriminator_loss, gan_generator_loss,
                     lpips_regression, mse_regression, pseudo_huber_regression, r1_penalty)
from .processes import NoiseProcess, shift_sigmas
from .optim import clip_and_step, guidance_groups
from .streams import Stream, check_streams
from .trainer_state import checkpoint_files, load_checkpoint_files
from .teachers import Teacher


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


def _trainable_copy(module: Optional[nn.Module], teacher: Callable, role: str) -> nn.Module:
    if module is not None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`{role}` must be a torch nn.Module to train, got {type(module).__name__}")
        return module
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"the teacher is a plain callable: pass `{role}` as an nn.Module to train")
    out = copy.deepcopy(teacher)
    out.requires_grad_(True)
    return out.train()


def _identity_encode(raw):
    return raw


class DMDTrainer:
    """One call of `train_step()` = one DMD2 iteration: maybe a generator update, always a fake-score update.

    `teacher` is a `Teacher` (process, sample shape, conditions, encoder and decoder come with it) or any
    denoiser callable D(x_s, s, cond) -> x0, which then needs `process`, `sample_shape` and its
    `prediction_type` (the fake score is trained with the teacher's own weighting, DMD Alg. 3).
    """

    def __init__(self, cfg: DistillConfig, teacher: Callable | Teacher, process: Optional[NoiseProcess] = None,
                 sample_shape: Optional[tuple] = None, *, conditions: Optional[Conditions] = None,
                 num_classes: int = 0, null_cond: Cond | int = None, prediction_type: Optional[str] = None,
                 pairs: Optional[Stream] = None, real: Optional[Stream] = None,
                 lpips_model: Optional[Callable] = None, generator_init: Optional[nn.Module] = None,
                 fake_init: Optional[nn.Module] = None, device: torch.device | str = "cpu",
                 pairs_guidance: float = 1.0) -> None:
        self.cfg, self.device, real_w = cfg, torch.device(device), cfg.guidance
        self.base_cfg = cfg  # with distill.phases, `cfg` becomes the running phase's settings (`_enter_phase`)
        self.encode: Callable = _identity_encode
        self.decode: Callable = _identity_encode
        self.decode_for_loss: Callable = _identity_encode
        if isinstance(teacher, Teacher):
            teacher = teacher.to(self.device).frozen()
            process, sample_shape = process or teacher.process, sample_shape or teacher.sample_shape
            prediction_type = prediction_type or teacher.prediction_type
            conditions = conditions or (teacher.conditions() if teacher.conditioning != "none" else None)
            null_cond = teacher.null_cond if null_cond is None else null_cond
            self.encode, self.decode, self.decode_for_loss = teacher.encode, teacher.decode, teacher.decode_for_loss
            if teacher.embedded_guidance:  # FLUX.1-dev: every network takes w as an input; the real score has no CFG
                self.encode, real_w = partial(teacher.encode_guided, w=cfg.guidance), 1.0
            teacher = teacher.denoiser
        if process is None or sample_shape is None:
            raise ValueError("a callable teacher needs `process` and `sample_shape`")
        self.prediction_type = prediction_type or getattr(teacher, "prediction_type", None)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"state the teacher's prediction_type (one of {PREDICTION_TYPES}): the fake score "
                             f"is trained with its weighting; got {self.prediction_type!r}")
        self.process, self.sample_shape = process, tuple(sample_shape)
        self.conditions = conditions if conditions is not None else (ClassLabels(num_classes) if num_classes else None)
        check_streams(cfg, pairs, real, lpips_model)
        self.pairs, self.real, self.lpips_model = pairs, real, lpips_model

        if isinstance(teacher, nn.Module):
            teacher = teacher.to(self.device).eval().requires_grad_(False)
        if cfg.guidance_range is not None and generator_init is None:
            teacher, generator_init, fake_init = guided_roles(cfg, teacher, fake_init, self.device)
        self.students = self._students(cfg, teacher, generator_init, fake_init)
        teacher = self.students.real
        self.mu_real = with_guidance(teacher, real_w, null_cond)
        self.teacher_denoiser, self.null_cond, self.pairs_guidance = teacher, null_cond, float(pairs_guidance)
        self.G = Generator(self.students.generator, process, cfg.generator_timesteps).to(self.device)
        self.mu_fake = self.students.fake.to(self.device)
        if cfg.gradient_checkpointing:
            for module in self.students.nets:
                if isinstance(module, NetDenoiser):
                    module.backbone.checkpointing(module.net, self.students.context_fn(module))
        # compile=auto on CUDA starts eager: the distill stage times a few steps and calls `compile` if it pays.
        resolved = accel.resolve_compile(cfg.compile, self.device)
        self.auto_compile_mode = resolved if cfg.compile == "auto" and resolved != "none" else None
        self.compile_mode = "none"
        if accel.resolve_channels_last(cfg.channels_last, self.device, lora=bool(cfg.lora_rank)):
            for module in (self.G.denoiser, self.mu_fake, *self.students.nets, teacher):
                if isinstance(module, nn.Module):
                    accel.channels_last(module)
        self.ema = self.students.ema(self.G.denoiser)
        if self.auto_compile_mode is None:
            self.compile(resolved)
        fake_params = [p for p in self.mu_fake.parameters() if p.requires_grad]
        self.gan_head, self.features = None, None
        if cfg.gan_used:  # from step 0 when any phase trains it: one state layout, RNG stream and checkpoint
            self.features = BottleneckFeatures(self.mu_fake)
            self.gan_head = GANHead(self.features.channels).to(self.device)
            fake_params += list(self.gan_head.parameters())
        adam = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        g_params = list(self.G.parameters())
        if cfg.guidance_range is not None and cfg.guidance_lr_scale != 1.0:
            g_params, fake_params = (guidance_groups(self.G.denoiser, g_params, cfg.guidance_lr_scale),
                                     guidance_groups(self.mu_fake, fake_params, cfg.guidance_lr_scale))
        self.opt_G = accel.adamw(g_params, self.device, lr=cfg.lr, **adam)
        # A fully frozen fake score (the real-score-only ablation, DMD Fig. 3a) has no optimizer.
        self.opt_fake = accel.adamw(fake_params, self.device, lr=cfg.lr_fake or cfg.lr, **adam) if fake_params else None
        self.rng = torch.Generator(self.device).manual_seed(cfg.seed)
        # A parallel wrapper (dmd_core.distributed) replaces both from outside: draws sliced by rank, collectives.
        self.draws, self.collective = Draws(self.rng, self.device), Collective()
        self.step = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.phase, self.phase_start = -1, 0
        self._enter_phase()

    def _enter_phase(self) -> None:
        """Put in place the settings of the phase that runs iteration `self.step` (distill.phases; DMD2 §5 trains
        DM + TTUR first, then the GAN at a lower lr): learning rates, GAN on/off and weights, TTUR ratio, lambda_reg,
        dm_weight. With the GAN off the head is neither run nor updated (its parameters get no gradient)."""
        k = self.base_cfg.phase_index(self.step)
        if k == self.phase:
            return
        self.phase, self.phase_start = k, self.base_cfg.phase_starts()[k]
        self.cfg = self.base_cfg.phase_config(k)
        if self.features is not None:
            self.features.enabled = self.cfg.gan.enabled

    def compile(self, mode: str) -> None:
        """torch.compile G, the fake score (in place: same objects, same state_dict keys, so after the EMA copy
        and at any step) and the real score; once."""
        if mode == "none" or self.compile_mode != "none":
            return
        scope = accel.resolve_compile_scope(self.cfg.compile_scope, self.cfg.gradient_checkpointing,
                                            lora=bool(self.cfg.lora_rank))
        for module in self.students.nets:  # each network once (a LoRA base once for all its adapters)
            accel.compile_in_place(module, mode, scope=scope)
        if not self.students.shares_teacher:
            self.mu_real = accel.compiled(self.mu_real, mode)
        self.compile_mode = mode

    def _students(self, cfg: DistillConfig, teacher: Callable, generator_init: Optional[nn.Module],
                  fake_init: Optional[nn.Module]) -> Students:
        """Full copies of the teacher (or of the given inits), or LoRA adapters over one shared base."""
        if not cfg.lora_rank:
            G = _trainable_copy(generator_init, teacher, "generator_init")
            fake = _trainable_copy(fake_init, teacher, "fake_init")
            return Students(G, fake, teacher, [m for m in (G, fake) if isinstance(m, nn.Module)])
        inits = [m.to(self.device) if isinstance(m, nn.Module) else m for m in (generator_init, fake_init)]
        dtype = torch.bfloat16 if self.device.type == "cuda" and cfg.bf16 else None  # the base, held once
        targets = student_lora_targets(cfg, teacher) if isinstance(teacher, nn.Module) else cfg.lora_targets
        return lora_students(teacher, *inits, cfg.lora_rank, cfg.lora_alpha, targets, cfg.seed, dtype)

    def agree(self, flag: bool) -> bool:
        """A decision every process takes the same way: rank 0's (one process: its own)."""
        return self.collective.agree(flag)

    # ---- sampling helpers -------------------------------------------------------------------
    def _randn(self, n: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self.draws.randn(n, self.sample_shape, dtype)

    def _cond(self, n: int) -> Cond:
        """Fresh conditions for n generator samples, drawn from the trainer's generator and encoded."""
        raw = self.draws.conditions(self.conditions, n)
        return None if raw is None else self.encode(raw)

    def _batch_cond(self, batch: dict) -> Cond:
        raw = batch.get("cond")
        return None if raw is None else self.encode(raw)

    def _levels(self, n: int, lo: float, hi: float) -> torch.Tensor:
        """n training levels in [lo, hi) from the trainer's generator (DMD Alg. 2-3), shifted by dm_time_shift."""
        s, k = self.draws.levels(self.process, n, lo, hi), self.cfg.dm_time_shift
        return s if k == 1.0 else shift_sigmas(s, k)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.cfg.bf16)

    def _guidance(self, n: int) -> Optional[torch.Tensor]:
        """Per-sample guidance scales from the trainer's generator, or None for a fixed-guidance student."""
        if self.cfg.guidance_range is None:
            return None
        return self.draws.guidance(n, self.cfg.guidance_range, self.cfg.guidance_law)

    def _pairs_w(self, batch: dict) -> torch.Tensor:
        """The w a guided G takes for each regression pair: its own when recorded (pairs at several w), else
        pairs_guidance; or, with regression_guidance=drawn, a fresh draw from the range as for the DM samples."""
        if self.cfg.regression_guidance == "drawn":
            return self._guidance(batch["z"].shape[0])
        if "guidance" in batch:
            return batch["guidance"].to(self.device, torch.float32)
        return torch.full((batch["z"].shape[0],), self.pairs_guidance, device=self.device)

    def generator_cond(self, cond: Cond, w: Optional[torch.Tensor]) -> Cond:
        """G's condition: `cond`, plus the guidance scales w (B,) for a guided student."""
        return cond if w is None else student_cond(self.G.denoiser, cond, w)

    def _real_score(self, w: Optional[torch.Tensor]) -> Callable:
        """mu_real: CFG at the fixed `guidance`, or at each sample's own w."""
        return self.mu_real if w is None else CFGDenoiser(self.teacher_denoiser, w, self.null_cond)

    def _fake_score(self, w: Optional[torch.Tensor]) -> Callable:
        """mu_fake, or for a guided student mu_fake(x_t, t, c, w): G's distribution at each sample's w, no CFG."""
        if w is None:
            return self.mu_fake
        return lambda x_t, t, cond: self.mu_fake(x_t, t, student_cond(self.mu_fake, cond, w))

    def _generate(self, z: torch.Tensor, cond: Cond) -> torch.Tensor:
        """x = G(z) with grad; a multi-step G trains one random step after backward simulation (DMD2 §4.3)."""
        k = self.draws.index(len(self.G.timesteps))  # one draw shared by every process (not a per-sample one)
        return self.G.backward_simulate(z, cond, k, noise=lambda x0: self._randn(x0.shape[0], x0.dtype))

    def _regression(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Regression loss (DMD Eq. 9): LPIPS on decoded images (decoder with grad), else in model space."""
        if self.cfg.regression == "lpips":
            with torch.no_grad():
                y = self.decode_for_loss(y)
            return lpips_regression(self.decode_for_loss(x), y, self.lpips_model)
        if self.cfg.regression == "pseudo_huber":
            return pseudo_huber_regression(x, y)
        return mse_regression(x, y)

    def _gan_logits(self, x0: torch.Tensor, cond: Cond,
                    draw: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Noise x0 at a random level (or at `draw`'s level and noise), run the fake score network, classify its
        bottleneck features."""
        n = x0.shape[0]
        s, noise = draw if draw is not None else self._gan_draw(n)
        self.mu_fake(self.process.add_noise(x0, noise, s), s, cond)
        return self.gan_head(self.features.take())

    def _gan_draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The level and noise one GAN input is seen at."""
        s = self._levels(n, 0.0, 1.0)
        return s, self._randn(n)

    def _discriminator_loss(self, x: torch.Tensor, cond: Cond, metrics: dict) -> torch.Tensor:
        """DMD2 Eq. 3 on a real batch and the generator's samples, plus gamma/2 R1 on the real batch when
        distill.gan.r1_weight > 0 (exact, or approximated by a perturbed second forward)."""
        gan = self.cfg.gan
        real = self.real.next_batch(self.device)
        y, real_cond = real["y"], self._batch_cond(real)
        draw, exact = self._gan_draw(y.shape[0]), gan.r1_weight > 0 and gan.r1 == "exact"
        if exact:  # a double backward: attention through the math kernel, the one that has it
            y = y.detach().float().requires_grad_(True)
            with sdpa_kernel([SDPBackend.MATH]):
                logits_real = self._gan_logits(y, real_cond, draw)
        else:
            logits_real = self._gan_logits(y, real_cond, draw)
        loss = gan_discriminator_loss(logits_real, self._gan_logits(x, cond)).mean()
        metrics["loss_gan_D"] = loss.detach()
        if gan.r1_weight == 0:
            return loss
        if exact:
            penalty = r1_penalty(logits_real, y).mean()
        else:
            perturbed = self._gan_logits(y + gan.r1_sigma * self._randn(y.shape[0]), real_cond, draw)
            penalty = approximate_r1_penalty(logits_real, perturbed, gan.r1_sigma).mean()
        metrics["loss_r1"] = penalty.detach()
        return loss + gan.r1_weight / 2 * penalty

    # ---- one iteration ----------------------------------------------------------------------
    def _clip_and_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, lr: float) -> Optional[float]:
        return clip_and_step(loss, opt, lr, self.cfg.grad_clip, self.cfg.warmup_steps, self.step, self.collective)

    def _generator_update(self, z: torch.Tensor, cond: Cond, metrics: dict,
                          w: Optional[torch.Tensor] = None) -> Optional[tuple]:
        """DMD Alg. 1 lines 5-13; returns the (detached) samples, conditions and scales the fake score trains on."""
        cfg, B = self.cfg, z.shape[0]
        self.opt_G.zero_grad(set_to_none=True)
        batch = self.pairs.next_batch(self.device) if cfg.regression != "none" else None
        concat = cfg.concat_regression and batch is not None
        n_dm = B + (batch["z"].shape[0] if concat else 0)
        s = self._levels(n_dm, cfg.dm_t_min, cfg.dm_t_max)
        eps = self._randn(n_dm)
        # The regression pairs were made at pairs.guidance (or each at its own w, pairs.guidance_scales): a guided
        # G regresses onto them at that w.
        w_ref = None if w is None or batch is None else self._pairs_w(batch)
        with self._autocast():
            if concat:  # Alg. 1 line 7: x = concat(x, x_ref), one generator forward for both
                cond = cond_cat(cond, self._batch_cond(batch))
                w = None if w is None else torch.cat([w, w_ref])
                x = self.G.step(torch.cat([z, batch["z"]]) * self.process.init_noise_sigma, 0,
                                self.generator_cond(cond, w))
                x_ref = x[B:]
            elif batch is not None and len(self.G.timesteps) == 1:
                # One forward for the DM and the regression batch; unlike Alg. 1 line 7 the outputs stay apart.
                w_all = None if w is None else torch.cat([w, w_ref])
                x_all = self.G.step(torch.cat([z, batch["z"]]) * self.process.init_noise_sigma, 0,
                                    self.generator_cond(cond_cat(cond, self._batch_cond(batch)), w_all))
                x, x_ref = x_all[:B], x_all[B:]
            else:
                x = self._generate(z, self.generator_cond(cond, w))
            loss_dm, _ = dm_loss(x.float(), self._real_score(w), self._fake_score(w), self.process, s, eps, cond,
                                 cfg.dm_weighting)
            loss_G = cfg.dm_weight * loss_dm.mean()
            metrics["loss_dm"] = loss_dm.detach().mean()
            if batch is not None:
                if len(self.G.timesteps) > 1:
                    x_ref = self.G.step(batch["z"] * self.process.init_noise_sigma, 0,
                                        self.generator_cond(self._batch_cond(batch), w_ref))
                loss_reg = self._regression(x_ref.float(), batch["y"].float()).mean()
                loss_G = loss_G + cfg.lambda_reg * loss_reg
                metrics["loss_reg"] = loss_reg.detach()
            if cfg.gan.enabled:
                loss_gan = gan_generator_loss(self._gan_logits(x.float(), cond)).mean()
                loss_G = loss_G + cfg.gan.weight_generator * loss_gan
                metrics["loss_gan_G"] = loss_gan.detach()
        metrics["loss_G"] = loss_G.detach()
        norm = self._clip_and_step(loss_G, self.opt_G, cfg.lr)
        if norm is None:
            return None
        metrics["grad_norm_G"] = norm
        self._update_ema()
        return x.detach().float(), cond, w

    def _fake_update(self, x: torch.Tensor, cond: Cond, w: Optional[torch.Tensor], metrics: dict) -> bool:
        """DMD Alg. 3: denoising loss of the fake score on stop-grad generator samples (+ DMD2 GAN head)."""
        cfg, B = self.cfg, x.shape[0]
        if self.opt_fake is None:
            return True
        self.opt_fake.zero_grad(set_to_none=True)
        s = self._levels(B, 0.0, 1.0)
        x_t = self.process.add_noise(x, self._randn(B), s)
        with self._autocast():
            pred = self._fake_score(w)(x_t, s, cond).float()
            weight = self.process.denoising_weight(s, x, self.prediction_type)
            loss_fake = denoising_loss(pred, x, weight).mean()
            loss = loss_fake
            if cfg.gan.enabled:
                loss = loss + cfg.gan.weight_discriminator * self._discriminator_loss(x, cond, metrics)
        metrics["loss_fake"] = loss_fake.detach()
        norm = self._clip_and_step(loss, self.opt_fake, cfg.lr_fake or cfg.lr)
        if norm is not None:
            metrics["grad_norm_fake"] = norm
        return norm is not None

    def train_step(self) -> dict:
        """One iteration (DMD Alg. 1; DMD2 TTUR: G every `fake_updates_per_generator` iterations)."""
        self._enter_phase()
        metrics: dict = {"step": self.step}
        if self.compile_mode == "reduce-overhead":
            accel.mark_step()
        B = self.cfg.batch_size
        z, cond = self._randn(B), self._cond(B)
        w = self._guidance(B)
        if (self.step - self.phase_start) % self.cfg.fake_updates_per_generator == 0:
            out = self._generator_update(z, cond, metrics, w)
        else:
            with torch.no_grad(), self._autocast():
                out = self._generate(z, self.generator_cond(cond, w)).float(), cond, w
        ok = out is not None and self._fake_update(*out, metrics)
        self._account(ok, metrics)
        self.step += 1
        # Losses stay on the device until here: one transfer for all of them; reported as means over processes.
        out = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        keys = sorted(k for k, v in out.items() if k.startswith("loss_") and isinstance(v, float))
        if keys and self.collective.world_size > 1:
            out.update(zip(keys, self.collective.mean([out[k] for k in keys])))
        return out

    def _account(self, ok: bool, metrics: dict) -> None:
        if ok:
            self.consecutive_nonfinite = 0
        else:
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
            for opt in (self.opt_G, self.opt_fake):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
                raise NonFiniteError(f"{self.consecutive_nonfinite} consecutive non-finite steps at step {self.step}")
        metrics["skipped"] = not ok
        metrics["nonfinite_skipped"] = self.nonfinite_skipped

    @torch.no_grad()
    def _update_ema(self) -> None:
        """theta_ema <- d theta_ema + (1 - d) theta, with the warm-up d = min(decay, (1 + n) / (10 + n)), n the
        generator updates so far."""
        n = self.base_cfg.generator_updates(self.step)
        d = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.G.denoiser.parameters()], 1.0 - d)

    def ema_generator(self) -> Generator:
        """The EMA weights as a generator with the same timesteps."""
        return Generator(self.ema, self.process, self.G.timesteps)

    # ---- exact resume -----------------------------------------------------------------------
    def state_files(self) -> dict[str, bytes]:
        """Everything needed to resume exactly, as file name -> bytes (safetensors + JSON, no pickle)."""
        return checkpoint_files(self)

    def load_state_files(self, files: dict[str, bytes]) -> None:
        """Restore from `state_files()` output; continues bit-exactly on the same device."""
        load_checkpoint_files(self, files)
        self._enter_phase()
