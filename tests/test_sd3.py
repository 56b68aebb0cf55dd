"""The `sd3` family on the tiny SD3-layout teacher: its conditions are StableDiffusion3Pipeline's, its Euler pairs
solver is the stock pipeline's own loop, and the 1- and 4-step exports load in the stock pipeline (a plain script,
no project code) and reproduce G + VAE decode."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd_core.denoisers import CFGDenoiser, NetDenoiser, cond_expand, cond_map
from dmd_core.exports import flow_student_scheduler
from dmd_core.generator import Generator
from dmd_core.teachers import load_teacher

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "teachers" / "sd3-tiny"
PROMPTS = ["a red bicycle leaning against a brick wall", "two cats on a sofa"]
ATOL = 1e-5

PLAIN_SD3 = """
import sys, torch
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1], text_encoder_3=None, tokenizer_3=None)  # no T5
z = load_file(sys.argv[2])["z"]
torch.manual_seed(1)  # the stock pipeline re-noises between steps from torch's global generator
img = pipe(sys.argv[4].split("|"), num_inference_steps=int(sys.argv[5]), guidance_scale=float(sys.argv[6]),
           output_type="pt", latents=z).images
save_file({"img": img.contiguous()}, sys.argv[3])
"""


def plain(export: Path, tmp_path: Path, z: torch.Tensor, steps: int, w: float = 1.0) -> torch.Tensor:
    save_file({"z": z.contiguous()}, str(tmp_path / "z.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PLAIN_SD3, str(export), str(tmp_path / "z.safetensors"),
                    str(tmp_path / "img.safetensors"), "|".join(PROMPTS), str(steps), str(w)], cwd=tmp_path, env=env,
                   check=True)
    return load_file(str(tmp_path / "img.safetensors"))["img"]


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("sd3", FOLDER)


def test_conditions_are_the_stock_pipelines(teacher):
    """Joint sequence (both CLIPs' penultimate states, padded, then the no-T5 zeros) and pooled projections equal
    StableDiffusion3Pipeline.encode_prompt; the null condition is the empty prompt's (its negative default)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, text_encoder_3=None, tokenizer_3=None)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                         do_classifier_free_guidance=True)
    cond, null = teacher.encode(PROMPTS), teacher.null_cond
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(null["encoder_hidden_states"], neg[:1], rtol=0, atol=1e-6)  # batch 1 vs 2 rounding
    torch.testing.assert_close(null["pooled_projections"], neg_pooled[:1], rtol=0, atol=1e-6)
    assert embeds.shape[1] == 77 + 256 and not embeds[:, 77:].any()  # no T5: the pipeline's zeros
    assert (teacher.codec.scale, teacher.codec.shift) == (1.5305, 0.0609)


def test_euler_pairs_are_the_stock_loop(teacher):
    """The pairs stage's Euler solver at guidance w equals the stock pipeline's own N-step sampling (CFG, shift 3)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, text_encoder_3=None, tokenizer_3=None)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = teacher.sample("euler", 6, z, teacher.encode(PROMPTS), 4.0)
    stock = pipe(PROMPTS, num_inference_steps=6, guidance_scale=4.0, latents=z, output_type="latent").images
    assert float((ours - stock).abs().max()) <= 1e-5


def test_cfg_is_the_formula(teacher):
    D = copy.deepcopy(teacher.denoiser).double()
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.tensor([1.0, 0.4], dtype=torch.float64)  # sigma 1 (alpha 0) is a valid level
    cond = cond_map(lambda v: v.double(), teacher.encode(PROMPTS))
    null = cond_map(lambda v: v.double(), teacher.null_cond)
    with torch.no_grad():
        got = CFGDenoiser(D, 5.0, null)(x, s, cond)
        x0_null, x0_cond = D(x, s, cond_expand(null, 2, cond)), D(x, s, cond)
    torch.testing.assert_close(got, x0_null + 5.0 * (x0_cond - x0_null), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all() and not torch.allclose(x0_null, x0_cond)


@pytest.mark.parametrize("timesteps", [[1000], [1000, 750, 500, 250]], ids=["1-step", "4-step"])
def test_export_loads_in_the_stock_pipeline(teacher, tmp_path, timesteps):
    """A perturbed student exported by the family; a plain script runs StableDiffusion3Pipeline with
    num_inference_steps=k and reproduces G + VAE decode on the same noise and re-noising generator."""
    net = teacher.student_net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pipe = teacher.family.export(teacher, net, timesteps)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    pipe.save_pretrained(tmp_path / "export", safe_serialization=True)
    G = Generator(NetDenoiser(net, teacher.process, teacher.prediction_type), teacher.process, timesteps)
    z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = (teacher.decode(G(z, teacher.encode(PROMPTS), generator=torch.Generator().manual_seed(1)))
                    / 2 + 0.5).clamp(0, 1)
    got = plain(tmp_path / "export", tmp_path, z, len(timesteps))
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert float((got - expected).abs().max()) <= ATOL


def test_flow_export_scheduler_places_the_student_sigmas(teacher):
    for ts in ([1000], [1000, 500], [1000, 750, 500, 250]):
        scheduler = flow_student_scheduler(teacher.process, ts)
        scheduler.set_timesteps(len(ts))
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), torch.tensor(ts, dtype=torch.float64) / 1000,
                                   rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1 - 1/k"):
        flow_student_scheduler(teacher.process, [999, 500])


def test_t5_encoder_is_used_when_the_folder_has_one(tmp_path):
    """With text_encoder_3 (T5) and tokenizer_3 in the folder, the joint sequence's last 256 tokens are T5's last
    hidden state, as StableDiffusion3Pipeline.encode_prompt computes them; the export ships T5 too."""
    import json
    import shutil

    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    from dmd_core.tiny import write_character_t5_tokenizer

    folder = tmp_path / "sd3-t5"
    shutil.copytree(FOLDER, folder)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8)).save_pretrained(folder / "text_encoder_3")
    write_character_t5_tokenizer(folder / "tokenizer_3")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index))
    teacher = load_teacher("sd3", folder)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu",
                                                  do_classifier_free_guidance=False)
    cond = teacher.encode(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert cond["encoder_hidden_states"][:, 77:].abs().sum() > 0
    exported = teacher.family.export(teacher, teacher.student_net(), [1000])
    assert type(exported.text_encoder_3).__name__ == "T5EncoderModel"
