"""A LoRA run of each latent preset exports `pytorch_lora_weights.safetensors`: the teacher folder's stock pipeline,
given the export's scheduler, loads it with `load_lora_weights` (a plain script, no project code) and reproduces the
merged export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a red bicycle leaning against a brick wall"
TOL = 2e-3  # the bound; the unfused LoRA path and merged weights differ by float32 rounding only

PLAIN = """
import json, sys, torch
from safetensors.torch import load_file, save_file
import diffusers
folder, z_file, out, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(folder, **spec["load"])
if len(sys.argv) > 5:  # the teacher + the export's scheduler (+ its LoRA)
    export = sys.argv[5]
    scheduler = json.load(open(f"{export}/scheduler/scheduler_config.json"))["_class_name"]
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(export, subfolder="scheduler")
    if sys.argv[6] == "lora":
        pipe.load_lora_weights(export)
z = load_file(z_file)["z"]
B, C, H, W = z.shape
latents = diffusers.FluxPipeline._pack_latents(z, B, C, H, W) if spec["pipeline"] == "FluxPipeline" else z
torch.manual_seed(1)
img = pipe([spec["prompt"]] * B, num_inference_steps=spec["steps"], guidance_scale=spec["guidance"], latents=latents,
           height=H * pipe.vae_scale_factor, width=W * pipe.vae_scale_factor, output_type="pt").images
save_file({"img": img.contiguous()}, out)
"""

PRESETS = {
    "sd-tiny": dict(pipeline="StableDiffusionPipeline", load={}, steps=1, guidance=1.0),
    "sdxl-tiny": dict(pipeline="StableDiffusionXLPipeline", load={"add_watermarker": False}, steps=1, guidance=1.0),
    "sd3-tiny": dict(pipeline="StableDiffusion3Pipeline", load={"text_encoder_3": None, "tokenizer_3": None},
                     steps=4, guidance=1.0),
    "flux-tiny": dict(pipeline="FluxPipeline", load={}, steps=4, guidance=3.5),
}


def plain(tmp_path: Path, folder: Path, spec: dict, *extra: str) -> torch.Tensor:
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    save_file({"z": z}, str(tmp_path / "z.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PLAIN, str(folder), str(tmp_path / "z.safetensors"),
                    str(tmp_path / "img.safetensors"), json.dumps({**spec, "prompt": PROMPT}), *extra],
                   cwd=tmp_path, env=env, check=True)
    return load_file(str(tmp_path / "img.safetensors"))["img"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_lora_export_loads_in_the_teachers_stock_pipeline(prefect_api, tmp_path, preset):
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    # lr raised so that four steps move a zero-initialised B visibly
    dmd(preset=preset, root=str(root), run_name="lora", stages=["teacher", "pairs", "distill", "export"],
        overrides=["distill.lora_rank=4", "distill.lr=0.01", "distill.compile=none"])
    export, teacher = root / "lora" / "export", REPO / "teachers" / preset
    lora_file = load_file(str(export / "pytorch_lora_weights.safetensors"))
    assert lora_file and all(".lora_A." in k or ".lora_B." in k for k in lora_file)
    card = (export / "README.md").read_text()
    assert "load_lora_weights" in card and "lora_scale" in card

    spec = PRESETS[preset]
    merged = plain(tmp_path, export, spec)
    with_lora = plain(tmp_path, teacher, spec, str(export), "lora")
    without = plain(tmp_path, teacher, spec, str(export), "none")
    assert merged.shape == with_lora.shape == (2, 3, 16, 16)
    assert float((with_lora - merged).abs().max()) <= TOL
    assert float((without - merged).abs().max()) > 10 * TOL  # the adapter is what makes the student


@pytest.mark.slow
def test_a_guided_lora_student_exports_the_merged_guided_pipeline(prefect_api, tmp_path):
    """distill.guidance_range with LoRA: the merged export is the stock guided StableDiffusionPipeline (a UNet with
    time_cond_proj_dim) whose output follows guidance_scale; no LoRA file, the teacher's UNet has no projection."""
    from flows.pipeline import dmd

    root = tmp_path / "artifacts"
    dmd(preset="sd-tiny", root=str(root), run_name="guided", stages=["teacher", "pairs", "distill", "export"],
        overrides=["distill.lora_rank=4", "distill.lr=0.01", "distill.compile=none", "distill.guidance_range=[1,3]"])
    export = root / "guided" / "export"
    assert not (export / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((export / "unet" / "config.json").read_text())["time_cond_proj_dim"]
    spec = PRESETS["sd-tiny"]
    at_1 = plain(tmp_path, export, {**spec, "guidance": 1.0})
    at_3 = plain(tmp_path, export, {**spec, "guidance": 3.0})
    assert at_1.shape == at_3.shape == (2, 3, 16, 16)
    # Same latents, same seed: without the adapted guidance projection the two calls agree exactly. Four steps
    # move its zero-initialised B only a little, hence a small but certain difference.
    assert float((at_3 - at_1).abs().max()) > 1e-4
