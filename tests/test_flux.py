"""The `flux` family on the tiny guidance-distilled FLUX.1-dev-layout teacher: its conditions are FluxPipeline's, its
Euler pairs solver is the stock pipeline's loop (packed latents, dynamic shift, embedded guidance), and the exports
load in the stock pipeline (a plain script, no project code), reproduce G + VAE decode at 1 and 4 steps, and honour
guidance_scale."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd_core.backbones import pack_latents, unpack_latents
from dmd_core.denoisers import NetDenoiser
from dmd_core.generator import Generator
from dmd_core.teachers import load_teacher

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "teachers" / "flux-tiny"
PROMPTS = ["a red bicycle leaning against a brick wall", "two cats on a sofa"]
ATOL = 1e-5

PLAIN_FLUX = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import FluxPipeline
pipe = FluxPipeline.from_pretrained(sys.argv[1])
z = load_file(sys.argv[2])["z"]
B, C, H, W = z.shape
packed = FluxPipeline._pack_latents(z, B, C, H, W)
torch.manual_seed(1)  # the stock pipeline re-noises between steps from torch's global generator
img = pipe(sys.argv[4].split("|"), num_inference_steps=int(sys.argv[5]), guidance_scale=float(sys.argv[6]),
           latents=packed, height=H * pipe.vae_scale_factor, width=W * pipe.vae_scale_factor, output_type="pt").images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


def plain(export: Path, tmp_path: Path, z: torch.Tensor, steps: int, w: float) -> torch.Tensor:
    save_file({"z": z.contiguous()}, str(tmp_path / "z.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PLAIN_FLUX, str(export), str(tmp_path / "z.safetensors"),
                    str(tmp_path / "img.safetensors"), "|".join(PROMPTS), str(steps), str(w)], cwd=tmp_path, env=env,
                   check=True)
    return load_file(str(tmp_path / "img.safetensors"))["img"]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("flux", FOLDER)


def test_packing_round_trips_as_the_pipeline():
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 8, 6)
    packed = pack_latents(z)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), z)


def test_conditions_are_the_stock_pipelines(teacher):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(FOLDER)
    with torch.no_grad():  # as in the pipeline's __call__ (T5's attention kernel differs with grad enabled)
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    cond = teacher.encode(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert embeds.shape[1] == 512 and teacher.embedded_guidance
    assert (teacher.codec.scale, teacher.codec.shift) == (0.3611, 0.1159)


def test_euler_pairs_are_the_stock_loop(teacher):
    """Euler at guidance w (the embedded input, no CFG) equals FluxPipeline's N-step sampling on the same latents:
    sigmas linspace(1, 1/N, N) shifted by exp(mu) of the token count."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(FOLDER)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = teacher.sample("euler", 6, z, teacher.encode(PROMPTS), 3.5)
    H, W = z.shape[-2:]
    stock = pipe(PROMPTS, num_inference_steps=6, guidance_scale=3.5, latents=pack_latents(z), output_type="latent",
                 height=H * pipe.vae_scale_factor, width=W * pipe.vae_scale_factor).images
    assert float((ours - unpack_latents(stock, H, W)).abs().max()) <= 1e-5


def student(teacher):
    net = teacher.student_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net


@pytest.mark.parametrize("timesteps", [[1000], [1000, 750, 500, 250]], ids=["1-step", "4-step"])
def test_export_loads_in_the_stock_pipeline(teacher, tmp_path, timesteps):
    """FluxPipeline with num_inference_steps=k reproduces G + VAE decode; the student takes w as its guidance input."""
    net = student(teacher)
    pipe = teacher.family.export(teacher, net, timesteps)
    assert type(pipe).__name__ == "FluxPipeline"
    pipe.save_pretrained(tmp_path / "export", safe_serialization=True)
    G = Generator(NetDenoiser(net, teacher.process, teacher.prediction_type), teacher.process, timesteps)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x0 = G(z, teacher.encode_guided(PROMPTS, 3.5), generator=torch.Generator().manual_seed(1))
        expected = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    got = plain(tmp_path / "export", tmp_path, z, len(timesteps), 3.5)
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL


def test_export_honours_guidance_scale(teacher, tmp_path):
    """Outputs at two guidance scales differ, and each is G at that w."""
    net = student(teacher)
    teacher.family.export(teacher, net, [1000]).save_pretrained(tmp_path / "export", safe_serialization=True)
    G = Generator(NetDenoiser(net, teacher.process, teacher.prediction_type), teacher.process, [1000])
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    images = {}
    for w in (1.5, 5.0):
        with torch.no_grad():
            expected = (teacher.decode(G(z, teacher.encode_guided(PROMPTS, w))) / 2 + 0.5).clamp(0, 1)
        images[w] = plain(tmp_path / "export", tmp_path, z, 1, w)
        assert float((images[w] - expected).abs().max()) <= ATOL
    assert float((images[1.5] - images[5.0]).abs().max()) > 1e-3


def test_trainer_feeds_guidance_to_every_network(teacher):
    """With an embedded-guidance teacher the real score runs once at batch B (no CFG) and the real, fake and
    generator networks all see guidance = distill.guidance."""
    from dmd_core.conditions import Prompts
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer

    trainer = DMDTrainer(DistillConfig(batch_size=2, regression="none", guidance=4.0, bf16=False,
                                       generator_timesteps=[1000]), teacher, conditions=Prompts(PROMPTS))
    seen = {"real": [], "fake": [], "G": []}

    def recorder(calls):
        return lambda _m, args, kwargs: calls.append((kwargs["hidden_states"].shape[0], kwargs["guidance"].tolist()))

    handles = [teacher.net.register_forward_pre_hook(recorder(seen["real"]), with_kwargs=True),
               trainer.mu_fake.net.register_forward_pre_hook(recorder(seen["fake"]), with_kwargs=True),
               trainer.G.denoiser.net.register_forward_pre_hook(recorder(seen["G"]), with_kwargs=True)]
    try:
        assert not trainer.train_step()["skipped"]
    finally:
        for h in handles:
            h.remove()
    assert seen["real"] == [(2, [4.0, 4.0])]
    assert seen["fake"] and all(g == [4.0, 4.0] for _, g in seen["fake"] + seen["G"])
