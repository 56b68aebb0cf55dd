"""Stock diffusers exports run the student exactly: StableDiffusionPipeline (DDIM / LCM) and DDIMPipeline.

Each export is saved, reloaded with plain `from_pretrained` (no custom code) and compared with the student's
steps written out by hand in float32 here: x0 from the UNet output (eps: (x - sigma eps) / alpha,
v: alpha x - sigma v, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) from the teacher's alphas_cumprod),
re-noising x = alpha' x0 + sigma' eps' with eps' drawn from the caller's generator, VAE decode, x / 2 + 0.5.
"""
import numpy as np
import pytest
import torch

from dmd_core.exports import ddim_export, inference_steps, stable_diffusion_export, student_scheduler
from dmd_core.tiny import SD_SCHEDULER, tiny_pixel_unet, tiny_sd_components, write_byte_tokenizer

PROMPTS = ["a red square", "two digits"]
# float32: a few ulps of x0. Eps-prediction at t = 999 divides by sqrt(abar) (0.0064 for DDPM linear betas), so
# x0 reaches ~1e2 and one ulp of sqrt(abar) moves it by ~1e-5: the bound scales with max |x0|.
ATOL = 1e-5


def tolerance(x0: torch.Tensor) -> float:
    return ATOL * max(1.0, float(x0.abs().max()))
PIXEL_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                       prediction_type="epsilon", clip_sample=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_byte_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def alpha_sigma(scheduler_config: dict, t: int) -> tuple[float, float]:
    """sqrt(abar_t), sqrt(1 - abar_t) in float64 from the teacher's betas (float32, as diffusers builds them)."""
    c = scheduler_config
    if c["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"]) ** 2
    else:
        betas = torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"])
    abar_t = torch.cumprod(1.0 - betas, 0)[t].double()
    return float(abar_t.sqrt()), float((1 - abar_t).sqrt())


def x0_by_hand(out, x, t, scheduler_config, prediction_type):
    alpha, sigma = alpha_sigma(scheduler_config, t)
    return (x - sigma * out) / alpha if prediction_type == "epsilon" else alpha * x - sigma * out


def sd_reference(parts, tokenizer, z, timesteps, prediction_type, generator=None):
    """The (multi-step) student on prompt embeddings, decoded to [0, 1]."""
    ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    emb = parts["text_encoder"](ids)[0]
    config = dict(parts["scheduler"].config)
    x = z
    for i, t in enumerate(timesteps):
        out = parts["unet"](x, torch.full((x.shape[0],), t), encoder_hidden_states=emb).sample
        x0 = x0_by_hand(out, x, t, config, prediction_type)
        if i + 1 < len(timesteps):
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            alpha, sigma = alpha_sigma(config, timesteps[i + 1])
            x = alpha * x0 + sigma * eps
    vae = parts["vae"]
    return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1), emb, x0


def save_and_reload_sd(parts, tokenizer, timesteps, prediction_type, folder):
    from diffusers import StableDiffusionPipeline

    pipe = stable_diffusion_export(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer,
                                   dict(parts["scheduler"].config), timesteps, prediction_type)
    pipe.save_pretrained(folder)
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is StableDiffusionPipeline and loaded.safety_checker is None
    assert torch.equal(loaded.scheduler.alphas_cumprod, parts["scheduler"].alphas_cumprod)  # the teacher's table
    return loaded


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("t_star", [999, 600])
@torch.no_grad()
def test_stable_diffusion_one_step_export_runs_the_student(tokenizer, tmp_path, t_star, prediction_type):
    parts = tiny_sd_components(prediction_type=prediction_type)
    pipe = save_and_reload_sd(parts, tokenizer, [t_star], prediction_type, tmp_path)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(t_star))
    images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, output_type="pt", latents=z).images
    expected, _, x0 = sd_reference(parts, tokenizer, z, [t_star], prediction_type)
    assert images.shape == expected.shape == (2, 3, 16, 16)
    assert (images - expected).abs().max() <= tolerance(x0)


@pytest.mark.parametrize("timesteps, prediction_type", [([999, 749, 499, 249], "epsilon"),
                                                        ([999, 499], "v_prediction")])
@torch.no_grad()
def test_stable_diffusion_multi_step_export_renoises_like_dmd2(tokenizer, tmp_path, timesteps, prediction_type):
    from dmd_core.denoisers import NetDenoiser
    from dmd_core.generator import Generator
    from dmd_core.processes import VPDiscrete

    parts = tiny_sd_components(prediction_type=prediction_type)
    pipe = save_and_reload_sd(parts, tokenizer, timesteps, prediction_type, tmp_path)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    images = pipe(PROMPTS, num_inference_steps=inference_steps(timesteps), guidance_scale=1.0, output_type="pt",
                  latents=z, generator=torch.Generator().manual_seed(7)).images
    expected, emb, x0 = sd_reference(parts, tokenizer, z, timesteps, prediction_type, torch.Generator().manual_seed(7))
    assert (images - expected).abs().max() <= tolerance(x0)
    # The trainer's generator draws the same re-noising eps from the same generator state.
    schedule = VPDiscrete.from_scheduler(parts["scheduler"])
    G = Generator(NetDenoiser(parts["unet"], schedule, prediction_type), schedule, timesteps)
    x0 = G(z, {"encoder_hidden_states": emb}, generator=torch.Generator().manual_seed(7))
    latents = pipe(PROMPTS, num_inference_steps=len(timesteps), guidance_scale=1.0, output_type="latent",
                   latents=z, generator=torch.Generator().manual_seed(7)).images
    assert (latents - x0).abs().max() <= tolerance(x0)


@pytest.mark.parametrize("t_star, prediction_type", [(999, "epsilon"), (600, "v_prediction")])
@torch.no_grad()
def test_ddim_pipeline_export_runs_the_one_step_pixel_student(tmp_path, t_star, prediction_type):
    from diffusers import DDIMPipeline

    unet = tiny_pixel_unet(size=8, channels=3)
    config = {**PIXEL_SCHEDULER, "prediction_type": prediction_type}
    ddim_export(unet, config, [t_star], prediction_type).save_pretrained(tmp_path)
    pipe = DDIMPipeline.from_pretrained(tmp_path)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=1,
                  output_type="np").images
    # DDIMPipeline draws z itself: randn_tensor((batch, C, H, W), generator) == torch.randn on the CPU generator.
    z = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    x0 = x0_by_hand(unet(z, torch.full((3,), t_star)).sample, z, t_star, config, prediction_type)
    expected = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == expected.shape == (3, 8, 8, 3)
    assert np.abs(images - expected).max() <= tolerance(x0)


def test_unrepresentable_timesteps_raise():
    assert type(student_scheduler(SD_SCHEDULER, [749, 499, 249], "epsilon")).__name__ == "LCMScheduler"
    for timesteps in ([999, 500], [999, 600, 100], [999, 0]):
        with pytest.raises(ValueError, match="not on any LCMScheduler grid"):
            student_scheduler(SD_SCHEDULER, timesteps, "epsilon")
    with pytest.raises(ValueError, match="strictly decreasing"):
        student_scheduler(SD_SCHEDULER, [499, 999], "epsilon")
    with pytest.raises(ValueError, match="one-step"):
        ddim_export(tiny_pixel_unet(), PIXEL_SCHEDULER, [999, 499], "epsilon")
    with pytest.raises(ValueError, match="class labels"):
        ddim_export(tiny_pixel_unet(num_classes=10), PIXEL_SCHEDULER, [999], "epsilon")
