"""Stock diffusers exports of a DMD generator: the student's steps expressed as DDIM / LCM scheduler configs.

One step at t*: `DDIMScheduler` (diffusers 0.42 `scheduling_ddim.py`) with `timestep_spacing="trailing"` and
`num_train_timesteps = t* + 1` gives the timesteps [t*] for `num_inference_steps=1`
(`np.round(np.arange(N, 0, -N / 1)) - 1`); the previous timestep t* - N is negative, so the previous
alpha is `final_alpha_cumprod = 1` (`set_alpha_to_one=True`) and `prev_sample = 1 * x0 + 0 * eps = x0`.
The alphas_cumprod table keeps the teacher's: when N differs from the teacher's T (or its beta schedule is
one DDIM/LCM lack) the teacher's betas are written as `trained_betas`, which set the table independently
of `num_train_timesteps` (that key only places the timestep grid). `steps_offset=t*` with "leading"
spacing would also give [t*], but `StableDiffusionPipeline.__init__` resets any steps_offset != 1 to 1.

Several steps (DMD2): `LCMScheduler` denoises, then re-noises with fresh noise
`randn_tensor(shape, generator=generator)` after every step but the last, as the DMD2 sampler does. Its
boundary scalings c_skip = 0.25 / ((s t)^2 + 0.25), c_out = s t / sqrt((s t)^2 + 0.25) give c_out == 1
exactly and c_skip < 1e-24 for s = 2^40 and 0 < t < 4096 (s t and (s t)^2 are exact in float32; 0.25 is
absorbed). Its grid for n steps is `((m - floor(i m / n)) k - 1)` with m = `original_inference_steps` and
k = num_train_timesteps // m, so a list is exact only when it lies on such a grid (e.g. [999, 749, 499, 249]
with m = 4); other lists raise ValueError and need the custom `DMDPipeline`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .denoisers import PREDICTION_TYPES

# Multiplies t in LCM's boundary condition so that c_out == 1 and c_skip ~ 0 (a power of two keeps s*t exact).
LCM_TIMESTEP_SCALING = 2.0**40
_NATIVE_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def inference_steps(generator_timesteps: Sequence[int]) -> int:
    """`num_inference_steps` to pass to the stock pipeline: one per generator timestep."""
    return len(generator_timesteps)


def _check_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"generator_timesteps must be strictly decreasing within [0, {T}), got {ts}")
    return ts


def _teacher_alphas_cumprod(teacher_scheduler_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """betas and alphas_cumprod the way `dmd_core.teachers.vp_schedule` reads them (a filtered DDPMScheduler)."""
    from .teachers import ddpm_scheduler

    ddpm = ddpm_scheduler(teacher_scheduler_config)
    return ddpm.betas, ddpm.alphas_cumprod


def _beta_config(teacher_scheduler_config: dict, num_train_timesteps: int, native: bool) -> dict:
    """Scheduler keys giving the teacher's alphas_cumprod with `num_train_timesteps` as the grid length."""
    betas, _ = _teacher_alphas_cumprod(teacher_scheduler_config)
    if native:
        keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
        plain = {k: teacher_scheduler_config[k] for k in keys if k in teacher_scheduler_config}
        return {**plain, "num_train_timesteps": num_train_timesteps}
    return {"num_train_timesteps": num_train_timesteps, "trained_betas": [float(b) for b in betas]}


def _build(cls, teacher_scheduler_config: dict, num_train_timesteps: int, **options):
    """`cls` over the teacher's exact alphas_cumprod: native beta keys when they reproduce it, else trained_betas."""
    _, abar = _teacher_alphas_cumprod(teacher_scheduler_config)
    T = abar.numel()
    schedule = teacher_scheduler_config.get("beta_schedule", "linear")
    native = num_train_timesteps == T and schedule in _NATIVE_BETA_SCHEDULES
    for use_native in ((True, False) if native else (False,)):
        scheduler = cls(**_beta_config(teacher_scheduler_config, num_train_timesteps, use_native), **options)
        if scheduler.alphas_cumprod.shape == abar.shape and torch.equal(scheduler.alphas_cumprod, abar):
            return scheduler
    raise ValueError(f"{cls.__name__} cannot reproduce the teacher's alphas_cumprod")  # not reached for DDPM betas


def _one_step_scheduler(teacher_scheduler_config: dict, t_star: int, prediction_type: str):
    from diffusers import DDIMScheduler

    scheduler = _build(DDIMScheduler, teacher_scheduler_config, t_star + 1, prediction_type=prediction_type,
                       timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1, clip_sample=False,
                       thresholding=False)
    scheduler.set_timesteps(1)
    if scheduler.timesteps.tolist() != [t_star] or float(scheduler.final_alpha_cumprod) != 1.0:
        raise ValueError(f"DDIMScheduler cannot place one step at t*={t_star}")
    return scheduler


def _lcm_is_exact(scheduler, ts: list[int]) -> bool:
    """The LCM grid equals `ts`, and at each t the boundary condition is denoised = x0 (c_out 1, c_skip ~ 0)."""
    scheduler.set_timesteps(len(ts))
    if scheduler.timesteps.tolist() != ts:
        return False
    for t in scheduler.timesteps:  # a 0-d long tensor, as the pipelines pass it
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        if float(c_out) != 1.0 or float(c_skip) > 2.0**-60:
            return False
    return True


def _multi_step_scheduler(teacher_scheduler_config: dict, ts: list[int], prediction_type: str, T: int):
    from diffusers import LCMScheduler

    n, first = len(ts), ts[0] + 1
    divisors = [m for m in range(n, first + 1) if first % m == 0]
    # The grid's first timestep is m * (N // m) - 1 = t_0, so m divides t_0 + 1; N = T needs no trained_betas.
    candidates = [(T, m) for m in divisors if T // m == first // m] + [(first, m) for m in divisors if first != T]
    for N, m in candidates:
        scheduler = _build(LCMScheduler, teacher_scheduler_config, N, prediction_type=prediction_type,
                           original_inference_steps=m, timestep_scaling=LCM_TIMESTEP_SCALING, set_alpha_to_one=True,
                           steps_offset=1, clip_sample=False, thresholding=False)
        if _lcm_is_exact(scheduler, ts):
            return scheduler
    raise ValueError(f"generator_timesteps {ts} are not on any LCMScheduler grid (original_inference_steps m, "
                     f"timesteps (m - floor(i m / n)) (N // m) - 1, all > 0); export with the custom DMDPipeline")


def student_scheduler(teacher_scheduler_config: dict, generator_timesteps: Sequence[int], prediction_type: str):
    """A stock scheduler whose `num_inference_steps=len(timesteps)` loop is the DMD/DMD2 generator.

    One timestep: DDIMScheduler (trailing, N = t* + 1, previous alpha 1). Several: LCMScheduler whose grid is
    the list and whose boundary condition is the identity on x0. ValueError when no config is exact.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    _, abar = _teacher_alphas_cumprod(teacher_scheduler_config)
    T = abar.numel()
    ts = _check_timesteps(generator_timesteps, T)
    if len(ts) == 1:
        return _one_step_scheduler(teacher_scheduler_config, ts[0], prediction_type)
    return _multi_step_scheduler(teacher_scheduler_config, ts, prediction_type, T)


def flow_student_scheduler(process, generator_timesteps: Sequence[int]):
    """A stock `FlowMatchEulerDiscreteScheduler` whose `num_inference_steps=k` loop is a k-step flow generator.

    A flow timestep names sigma = t / T (`RectifiedFlow.level`). The teacher's shift is not kept: `set_timesteps`
    would apply it again to the student's sigmas. With shift 1 the k-step grid is 1 - i (1 - u_min) / (k - 1), and
    `shift_terminal` = the last sigma stretches it to the DMD2-style 1, 1 - 1/k, ..., 1/k exactly; FluxPipeline's
    own sigmas (linspace(1, 1/k, k)) are left unchanged by it. `stochastic_sampling` re-noises x0 with fresh noise
    from the pipeline's generator between steps (DMD2 §4.3). ValueError for any other sigmas.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    ts = [int(t) for t in generator_timesteps]
    sigmas = [t / process.T for t in ts]
    k = len(ts)
    even = [1 - i / k for i in range(k)]
    if any(abs(a - b) > 1e-9 for a, b in zip(sigmas, even)):
        raise ValueError(f"generator_timesteps {ts}: a flow export's stock grid has sigmas 1, 1 - 1/k, ..., 1/k, "
                         f"i.e. timesteps {[round(process.T * s) for s in even]}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=process.T, shift=1.0, use_dynamic_shifting=False,
                                                stochastic_sampling=True,
                                                shift_terminal=sigmas[-1] if k > 1 else None)
    scheduler.set_timesteps(k)
    if (scheduler.sigmas[:-1].double() - torch.tensor(sigmas, dtype=torch.float64)).abs().max() > 1e-6:
        raise ValueError(f"FlowMatchEulerDiscreteScheduler cannot place sigmas {sigmas}")
    return scheduler


def stable_diffusion_export(unet, vae, text_encoder, tokenizer, teacher_scheduler_config: dict,
                            generator_timesteps: Sequence[int], prediction_type: str):
    """A stock `StableDiffusionPipeline` that runs the student as
    `pipe(prompt, num_inference_steps=len(generator_timesteps), guidance_scale=1.0, latents=z, generator=g)`.

    `latents=z` is the generator's input noise; with several steps the re-noising eps come from `generator`
    in the trainer's order (one `randn` of the latent shape after each step but the last). No safety checker.
    """
    from diffusers import StableDiffusionPipeline

    scheduler = student_scheduler(teacher_scheduler_config, generator_timesteps, prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ddim_export(unet, teacher_scheduler_config: dict, generator_timesteps: Sequence[int], prediction_type: str):
    """A stock `DDIMPipeline` that runs a one-step unconditional pixel student as
    `pipe(batch_size=n, generator=g, num_inference_steps=1)`; its z is `randn_tensor((n, C, H, W), generator=g)`.

    DDIMPipeline cannot re-noise between steps nor pass class labels: ValueError for several timesteps or a
    class-conditional UNet (use the custom `DMDPipeline`).
    """
    from diffusers import DDIMPipeline

    if len(generator_timesteps) != 1:
        raise ValueError(f"DDIMPipeline runs one-step students only, got generator_timesteps "
                         f"{list(generator_timesteps)}; export several steps with the custom DMDPipeline")
    if getattr(unet.config, "num_class_embeds", None) or getattr(unet.config, "class_embed_type", None):
        raise ValueError("DDIMPipeline cannot pass class labels; export class-conditional students with DMDPipeline")
    scheduler = student_scheduler(teacher_scheduler_config, generator_timesteps, prediction_type)
    return DDIMPipeline(unet=unet, scheduler=scheduler)


LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(pipe, net, folder: str, weights: dict[str, torch.Tensor], rank: int, alpha: Optional[float]) -> bool:
    """`pytorch_lora_weights.safetensors` (diffusers' format, with its LoraConfig as metadata) beside a merged export,
    for the teacher's stock pipeline's `load_lora_weights`; False when the pipeline class has no LoRA loader.
    `net` is the pipeline component the adapter belongs to (its unet or transformer)."""
    from .adapters import lora_file_state, lora_metadata

    if not hasattr(type(pipe), "save_lora_weights"):
        return False
    component = next(name for name, module in pipe.components.items() if module is net)
    state = lora_file_state(weights)
    type(pipe).save_lora_weights(folder, **{f"{component}_lora_layers": state,
                                            f"{component}_lora_adapter_metadata": lora_metadata(state, rank, alpha)})
    return True
