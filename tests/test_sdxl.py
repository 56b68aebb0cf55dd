"""The `sdxl` family on the tiny SDXL-layout teacher: its conditions are StableDiffusionXLPipeline's, CFG is the
formula, the fake score is never guided, and the 1- and 4-step exports load in the stock pipeline (a plain script,
no project code) and reproduce G + VAE decode."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd_core.conditions import Prompts
from dmd_core.config import DistillConfig
from dmd_core.denoisers import CFGDenoiser, cond_expand, cond_map
from dmd_core.generator import Generator
from dmd_core.teachers import load_teacher
from dmd_core.trainer import DMDTrainer

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "teachers" / "sdxl-tiny"
PROMPTS = ["a red bicycle leaning against a brick wall", "two cats on a sofa"]
ATOL = 1e-5

PLAIN_SDXL = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1], add_watermarker=False)
z = load_file(sys.argv[2])["z"]
img = pipe(sys.argv[4].split("|"), num_inference_steps=int(sys.argv[5]), guidance_scale=1.0, output_type="pt",
           latents=z, generator=torch.Generator().manual_seed(1)).images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("sdxl", FOLDER)


def test_conditions_are_the_stock_pipelines(teacher):
    """Prompt embeds (both encoders' penultimate states), pooled embeds, time ids and the zero negative condition
    equal StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids on the same folder."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(FOLDER, add_watermarker=False)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond, null = teacher.encode(PROMPTS), teacher.null_cond
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    assert embeds.shape[-1] == 64 and not neg.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt
    assert torch.equal(null["encoder_hidden_states"], neg[:1]) and torch.equal(null["added_cond_kwargs"]["text_embeds"],
                                                                                neg_pooled[:1])
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=embeds.dtype, text_encoder_projection_dim=32)
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], ids.expand(2, -1))
    assert teacher.codec.scale == 0.13025


def test_cfg_with_sdxl_conditions_is_the_formula(teacher):
    """x0 = D(x, s, null) + w (D(x, s, c) - D(x, s, null)), null the zero condition with the same time ids.
    In float64: float32 convolutions on some CPUs round differently at batch 2B (the CFG call) than at B."""
    D = copy.deepcopy(teacher.denoiser).double()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.tensor([0.25, 0.75])
    cond, w = cond_map(lambda v: v.double(), teacher.encode(PROMPTS)), 5.0
    null = cond_map(lambda v: v.double(), teacher.null_cond)
    with torch.no_grad():
        got = CFGDenoiser(D, w, null)(x, s, cond)
        x0_null, x0_cond = D(x, s, cond_expand(null, 2, cond)), D(x, s, cond)
    torch.testing.assert_close(got, x0_null + w * (x0_cond - x0_null), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(x0_null, x0_cond)


def test_fake_score_is_never_guided(teacher):
    """The real score runs CFG (batch 2B, null rows zero); the fake score sees the prompts alone, batch B."""
    trainer = DMDTrainer(DistillConfig(batch_size=2, regression="none", guidance=3.0, bf16=False), teacher,
                         conditions=Prompts(PROMPTS))
    real, fake = [], []

    def recorder(calls):
        return lambda _m, args, kwargs: calls.append((args[0].shape[0], kwargs["added_cond_kwargs"]["text_embeds"]))

    handles = [teacher.net.register_forward_pre_hook(recorder(real), with_kwargs=True),
               trainer.mu_fake.net.register_forward_pre_hook(recorder(fake), with_kwargs=True)]
    try:
        assert not trainer.train_step()["skipped"]
    finally:
        for h in handles:
            h.remove()
    assert [n for n, _ in real] == [4] and not real[0][1][:2].any() and real[0][1][2:].any()
    assert [n for n, _ in fake] == [2, 2] and all(pooled.abs().sum(1).min() > 0 for _, pooled in fake)


@pytest.mark.parametrize("timesteps", [[399], [999, 749, 499, 249]], ids=["1-step", "4-step"])
def test_export_loads_in_the_stock_pipeline(teacher, tmp_path, timesteps):
    """A student (the teacher's UNet, perturbed) exported by the family; a plain script loads it with
    StableDiffusionXLPipeline and reproduces G + VAE decode on the same noise (and re-noising generator)."""
    net = teacher.student_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pipe = teacher.family.export(teacher, net, timesteps)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    pipe.save_pretrained(tmp_path / "export", safe_serialization=True)
    from dmd_core.denoisers import NetDenoiser

    G = Generator(NetDenoiser(net, teacher.process, teacher.prediction_type), teacher.process, timesteps)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = (teacher.decode(G(z, teacher.encode(PROMPTS), generator=torch.Generator().manual_seed(1)))
                    / 2 + 0.5).clamp(0, 1)
    save_file({"z": z.contiguous()}, str(tmp_path / "z.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PLAIN_SDXL, str(tmp_path / "export"), str(tmp_path / "z.safetensors"),
                    str(tmp_path / "img.safetensors"), "|".join(PROMPTS), str(len(timesteps))], cwd=tmp_path,
                   env=env, check=True)
    got = load_file(str(tmp_path / "img.safetensors"))["img"]
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL


def test_fp16_fix_vae_folder_loads_and_exports_as_is(tmp_path):
    """An fp16-fix VAE in vae/ (madebyollin/sdxl-vae-fp16-fix: same layout and scaling, force_upcast false) loads
    like the stock one, and the export keeps its config, so the stock pipeline does not upcast it to fp32."""
    import json
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(FOLDER, folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    assert config.get("force_upcast", True) is not False  # the shipped tiny teacher has the stock VAE's flag
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    fixed = load_teacher("sdxl", folder)
    assert fixed.codec.scale == 0.13025 and fixed.codec.vae.config.force_upcast is False
    pipe = fixed.family.export(fixed, fixed.student_net(), [399])
    pipe.save_pretrained(tmp_path / "export", safe_serialization=True)
    exported = json.loads((tmp_path / "export" / "vae" / "config.json").read_text())
    assert exported["force_upcast"] is False and exported["scaling_factor"] == 0.13025
