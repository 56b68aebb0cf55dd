"""`sd-tiny`, `pixel-tiny`, `sdxl-tiny`, `sd3-tiny` and `flux-tiny` end to end through the Prefect flow; the exports load in stock diffusers pipelines
(a plain script, no project code) and reproduce the trainer's EMA generator (+ VAE decode) on the same noise."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd_core.denoisers import NetDenoiser
from dmd_core.generator import Generator
from dmd_core.teachers import load_teacher
from storage import iter_shards, read_manifest, read_manifest_metadata
from storage.checkpoints import checkpoint_keys, checkpoint_weights
from storage.layout import METRICS, PAIRS_MANIFEST, run_store

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red bicycle leaning against a brick wall"
ATOL = 1e-5  # float32 on CPU; measured ~3e-7 (the two paths run the same ops in a different order)
# A pixel student's x0 at t=999 is (x - sigma eps) / alpha with alpha = 0.0064: float32 rounding of eps (~1e-7) grows
# 156-fold, halved in image space. Measured 3e-7 on one CPU, 2.1e-5 on another (AMD EPYC, AVX-512).
ATOL_T999 = 5e-5

PLAIN_SD = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
z = load_file(sys.argv[2])["z"]
img = pipe([sys.argv[4]] * z.shape[0], num_inference_steps=1, guidance_scale=1.0, output_type="pt", latents=z).images
save_file({"img": img.contiguous()}, sys.argv[3])
"""

PLAIN_DDIM = """
import sys, torch
from safetensors.torch import save_file
from diffusers import DDIMPipeline
pipe = DDIMPipeline.from_pretrained(sys.argv[1])
img = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=1, output_type="np").images
save_file({"img": torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()}, sys.argv[3])
"""


def plain(script: str, export: Path, tmp_path: Path, z: torch.Tensor) -> torch.Tensor:
    save_file({"z": z.contiguous()}, str(tmp_path / "z.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script, str(export), str(tmp_path / "z.safetensors"),
                    str(tmp_path / "img.safetensors"), PROMPT], cwd=tmp_path, env=env, check=True)
    return load_file(str(tmp_path / "img.safetensors"))["img"]


def ema_generator(store, teacher, step: int, timesteps=(999,)) -> Generator:
    unet = teacher.student_net().eval()
    (key,) = checkpoint_keys(store)  # the run's one set of checkpoints
    unet.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint_weights(store, step, key).items()})
    return Generator(NetDenoiser(unet, teacher.process, teacher.prediction_type), teacher.process, list(timesteps))


@pytest.mark.slow
def test_sd_tiny_end_to_end(prefect_api, tmp_path):
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="sd-tiny", root=str(root), run_name="sd")
    store = run_store(str(root), "sd")
    records = read_manifest(store, PAIRS_MANIFEST)
    assert sum(r.n_samples for r in records) == 16
    meta = read_manifest_metadata(store, PAIRS_MANIFEST)
    assert (meta["solver"], meta["steps"], meta["guidance"], meta["dtype"]) == ("pndm", 3, 3.0, "float16")
    sample = next(iter_shards([store.url(records[0].shard)], store.storage_options, nodesplitter=None))
    assert sample["noise.npy"].shape == (4, 8, 8) and sample["image.npy"].dtype == np.float16
    assert isinstance(sample["json"]["prompt"], str) and sample["json"]["prompt"]
    metrics = store.read_table(METRICS).to_pylist()
    assert all(np.isfinite(r["loss_reg"]) and np.isfinite(r["loss_dm"]) for r in metrics)

    teacher = load_teacher("sd", REPO / "teachers" / "sd-tiny")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x0 = ema_generator(store, teacher, 4)(z, teacher.encode([PROMPT] * 2))
        expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain(PLAIN_SD, root / "sd" / "export", tmp_path, z)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL
    # the student moved away from the teacher (training happened) but the export is the EMA student
    with torch.no_grad():
        teacher_x0 = Generator(teacher.denoiser, teacher.process, [999])(z, teacher.encode([PROMPT] * 2))
    assert not torch.allclose(teacher_x0, x0)


@pytest.mark.slow
def test_pixel_tiny_end_to_end(prefect_api, tmp_path):
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="pixel-tiny", root=str(root), run_name="px")
    store = run_store(str(root), "px")
    assert (root / "px" / "export" / "model_index.json").read_text().count("DDIMPipeline") == 1
    teacher = load_teacher("unet2d", REPO / "teachers" / "pixel-tiny")
    z = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))  # DDIMPipeline's own draw
    with torch.no_grad():
        expected = (ema_generator(store, teacher, 4)(z) / 2 + 0.5).clamp(0, 1)
    got = plain(PLAIN_DDIM, root / "px" / "export", tmp_path, z)
    assert float((got - expected).abs().max()) <= ATOL_T999


PLAIN_SDXL = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], add_watermarker=False)
z = load_file(sys.argv[2])["z"]
img = pipe([sys.argv[4]] * z.shape[0], num_inference_steps=1, guidance_scale=1.0, output_type="pt", latents=z).images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


@pytest.mark.slow
def test_sdxl_tiny_end_to_end(prefect_api, tmp_path):
    """The SDXL preset through the flow: Euler pairs with CFG, DM + LPIPS + GAN, a one-step (t* = 399) export that
    stock StableDiffusionXLPipeline runs in one step to G + VAE decode of the EMA student."""
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="sdxl-tiny", root=str(root), run_name="xl")
    store = run_store(str(root), "xl")
    records = read_manifest(store, PAIRS_MANIFEST)
    assert sum(r.n_samples for r in records) == 16
    meta = read_manifest_metadata(store, PAIRS_MANIFEST)
    assert (meta["solver"], meta["steps"], meta["guidance"]) == ("euler", 3, 3.0)
    metrics = store.read_table(METRICS).to_pylist()
    assert len(metrics) == 4 and all(np.isfinite(r["loss_fake"]) for r in metrics)
    g_steps = [r for r in metrics if r["step"] % 2 == 0]  # TTUR 2: G updates on every other step, NaN rows between
    assert all(np.isfinite(r["loss_dm"]) and np.isfinite(r["loss_reg"]) and np.isfinite(r["loss_gan_G"])
               for r in g_steps)
    assert (root / "xl" / "export" / "model_index.json").read_text().count("StableDiffusionXLPipeline") == 1

    teacher = load_teacher("sdxl", REPO / "teachers" / "sdxl-tiny")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x0 = ema_generator(store, teacher, 4, [399])(z, teacher.encode([PROMPT] * 2))
        expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain(PLAIN_SDXL, root / "xl" / "export", tmp_path, z)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL


PLAIN_SD3 = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1], text_encoder_3=None, tokenizer_3=None)
z = load_file(sys.argv[2])["z"]
torch.manual_seed(1)
img = pipe([sys.argv[4]] * z.shape[0], num_inference_steps=4, guidance_scale=1.0, output_type="pt", latents=z).images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


@pytest.mark.slow
def test_sd3_tiny_end_to_end(prefect_api, tmp_path):
    """The rectified-flow preset through the flow: Euler pairs with CFG, a 4-step generator (sigmas 1 .. 0.25) with
    backward simulation, DM + LPIPS + GAN on transformer tokens; stock StableDiffusion3Pipeline at 4 steps reproduces
    G + VAE decode of the EMA student, re-noising from torch's global generator."""
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="sd3-tiny", root=str(root), run_name="s3")
    store = run_store(str(root), "s3")
    meta = read_manifest_metadata(store, PAIRS_MANIFEST)
    assert (meta["solver"], meta["steps"], meta["guidance"]) == ("euler", 3, 3.0)
    metrics = store.read_table(METRICS).to_pylist()
    assert len(metrics) == 4 and all(np.isfinite(r["loss_dm"]) and np.isfinite(r["loss_gan_G"]) for r in metrics)
    assert (root / "s3" / "export" / "model_index.json").read_text().count("StableDiffusion3Pipeline") == 1

    teacher = load_teacher("sd3", REPO / "teachers" / "sd3-tiny")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        G = ema_generator(store, teacher, 4, [1000, 750, 500, 250])
        x0 = G(z, teacher.encode([PROMPT] * 2), generator=torch.Generator().manual_seed(1))
        expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain(PLAIN_SD3, root / "s3" / "export", tmp_path, z)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL


PLAIN_FLUX = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained(sys.argv[1])
z = load_file(sys.argv[2])["z"]
B, C, H, W = z.shape
torch.manual_seed(1)
img = pipe([sys.argv[4]] * B, num_inference_steps=4, guidance_scale=3.5, latents=FluxPipeline._pack_latents(z, B, C, H, W),
           height=H * pipe.vae_scale_factor, width=W * pipe.vae_scale_factor, output_type="pt").images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


@pytest.mark.slow
def test_flux_tiny_end_to_end(prefect_api, tmp_path):
    """The guidance-distilled Flux preset through the flow: pairs at the embedded guidance 3.5, a 4-step student
    taking the same input; stock FluxPipeline at guidance_scale=3.5 reproduces G + VAE decode of the EMA student."""
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="flux-tiny", root=str(root), run_name="fx")
    store = run_store(str(root), "fx")
    assert read_manifest_metadata(store, PAIRS_MANIFEST)["guidance"] == 3.5
    metrics = store.read_table(METRICS).to_pylist()
    assert len(metrics) == 4 and all(np.isfinite(r["loss_dm"]) and np.isfinite(r["loss_fake"]) for r in metrics)

    teacher = load_teacher("flux", REPO / "teachers" / "flux-tiny")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        G = ema_generator(store, teacher, 4, [1000, 750, 500, 250])
        x0 = G(z, teacher.encode_guided([PROMPT] * 2, 3.5), generator=torch.Generator().manual_seed(1))
        expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain(PLAIN_FLUX, root / "fx" / "export", tmp_path, z)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL
