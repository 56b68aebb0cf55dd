"""One full-weight DMD step on the SDXL architecture (random weights, 128x128x4 latents): the project's trainer
against a minimal eager loop doing the same work, in one call, at growing batch until one runs out of memory.

python bench/sdxl_train_step.py [--batches 1,2,4,8] [--iters 4] [--variants none:on,default:off] [--out OUT.json]
python bench/sdxl_train_step.py --tiny      (CPU smoke run on the tiny SDXL layout, batch 2)

Both sides: fp32 G and fake score (fused AdamW on CUDA, clip-norm 10, EMA of G), a bf16 frozen teacher, bf16
autocast, gradient checkpointing on the trained UNets; a generator update (one-step G at t* = 399 on B prompts, CFG
real score at w = 8 by batch doubling with the zero null condition, fake score without grad, the DM loss) and a
fake-score update (denoising loss). No regression, no GAN. Fresh noise, levels and prompts every step. The text
encoders have SDXL's widths (768, 1280) and two layers each: they run once per step on both sides.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sd15_train_step import PROMPTS, run_case  # noqa: E402

from dmd_core.conditions import Prompts  # noqa: E402
from dmd_core.denoisers import NetDenoiser  # noqa: E402
from dmd_core.teachers import LatentCodec, Teacher, vp_process  # noqa: E402
from dmd_core.tiny import SDXL_SCHEDULER, tiny_sdxl_components, write_byte_tokenizer  # noqa: E402

GUIDANCE, LR, CLIP, T_STAR = 8.0, 5e-7, 10.0, 399


def sdxl_unet():
    """stabilityai/stable-diffusion-xl-base-1.0's UNet config (2.6 B parameters), random init."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def sdxl_components(unet=None) -> dict:
    """`sdxl_unet()` (or the given UNet); shallow CLIP towers of SDXL's widths; a small VAE (unused by the step)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = unet if unet is not None else sdxl_unet()

    def clip(width, cls):
        return cls(CLIPTextConfig(vocab_size=514, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                                  num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=512,
                                  eos_token_id=513, pad_token_id=513, projection_dim=1280, hidden_act="gelu"))

    vae = AutoencoderKL(latent_channels=4, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, scaling_factor=0.13025)
    return {"unet": unet, "vae": vae, "text_encoder": clip(768, CLIPTextModel),
            "text_encoder_2": clip(1280, CLIPTextModelWithProjection)}


def build_teacher(tiny: bool, device: str) -> Teacher:
    from transformers import CLIPTokenizer

    parts = tiny_sdxl_components() if tiny else sdxl_components()
    folder = tempfile.mkdtemp(prefix="byte-tokenizer-")
    write_byte_tokenizer(folder, max_length=77)
    process = vp_process(SDXL_SCHEDULER)
    unet = parts["unet"].to(torch.bfloat16 if device == "cuda" else torch.float32)
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    tok = CLIPTokenizer.from_pretrained(folder)
    teacher = Teacher(kind="sdxl", denoiser=NetDenoiser(unet, process, "epsilon"), process=process, sample_shape=shape,
                      prediction_type="epsilon",
                      encoders={"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]},
                      tokenizers={"tokenizer": tok, "tokenizer_2": tok},
                      codec=LatentCodec(parts["vae"], 0.13025), scheduler_config=dict(SDXL_SCHEDULER),
                      pipeline_config={"force_zeros_for_empty_prompt": True})
    return teacher.to(device).frozen()


def fp32_copy(teacher: Teacher) -> NetDenoiser:
    return NetDenoiser(copy.deepcopy(teacher.net).float().requires_grad_(True).train(), teacher.process, "epsilon")


def project_step(teacher: Teacher, batch: int, device: str, compile: str = "none", channels_last=None):
    """The project's path: DMDTrainer.train_step (one G update + one fake update) at `distill.compile` and
    `distill.channels_last` (None: the default, on for CUDA)."""
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer

    cfg = DistillConfig(batch_size=batch, regression="none", guidance=GUIDANCE, lr=LR, grad_clip=CLIP, bf16=True,
                        gradient_checkpointing=True, generator_timesteps=[T_STAR], compile=compile,
                        channels_last=channels_last)
    trainer = DMDTrainer(cfg, teacher, conditions=Prompts(PROMPTS), generator_init=fp32_copy(teacher),
                         fake_init=fp32_copy(teacher), device=device)
    return trainer.train_step


class EagerStep:
    """The same step with plain torch and diffusers modules: nothing from dmd_core's trainer, denoiser or family."""

    def __init__(self, teacher: Teacher, batch: int, device: str) -> None:
        self.dev, self.B, self.shape, self.teacher = torch.device(device), batch, teacher.sample_shape, teacher
        self.real = teacher.net
        self.G = copy.deepcopy(self.real).float().requires_grad_(True).train()
        self.fake = copy.deepcopy(self.real).float().requires_grad_(True).train()
        for unet in (self.G, self.fake):
            unet.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        adam = dict(lr=LR, betas=(0.9, 0.999), weight_decay=0.01, fused=self.dev.type == "cuda")
        self.opt_G = torch.optim.AdamW(self.G.parameters(), **adam)
        self.opt_fake = torch.optim.AdamW(self.fake.parameters(), **adam)
        abar = teacher.process.alphas_cumprod.float().to(self.dev)
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.n = 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple:
        """StableDiffusionXLPipeline.encode_prompt: penultimate states of both towers, pooled from the second."""
        states, pooled = [], None
        for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            t, e = self.teacher.tokenizers[tok], self.teacher.encoders[enc]
            ids = t(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            out = e(ids.to(self.dev), output_hidden_states=True)
            pooled = out[0] if out[0].ndim == 2 else pooled
            states.append(out.hidden_states[-2])
        h, w = 8 * self.shape[1], 8 * self.shape[2]
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.dev, dtype=torch.float32).expand(len(prompts), -1)
        return torch.cat(states, -1), pooled, ids

    def x0(self, unet, x_t, t, ehs, pooled, ids):
        eps = unet(x_t, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        return (x_t - s * eps.sample.float()) / a

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda")

    def __call__(self) -> None:
        B, dev = self.B, self.dev
        prompts = [PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (B,)).tolist()]
        ehs, pooled, ids = self.encode(prompts)
        z = torch.randn(B, *self.shape, device=dev)
        t_star = torch.full((B,), T_STAR, device=dev)
        t, eps = torch.randint(20, 980, (B,), device=dev), torch.randn(B, *self.shape, device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        self.opt_G.zero_grad(set_to_none=True)
        with self.autocast():
            x = self.x0(self.G, z, t_star, ehs, pooled, ids)
            with torch.no_grad():
                x_t = a * x + s * eps
                cat = lambda v: torch.cat([torch.zeros_like(v), v])  # noqa: E731  the zero null condition
                uncond, cond = self.x0(self.real, torch.cat([x_t, x_t]), torch.cat([t, t]), cat(ehs), cat(pooled),
                                       torch.cat([ids, ids])).chunk(2)
                mu_real = uncond + GUIDANCE * (cond - uncond)
                mu_fake = self.x0(self.fake, x_t, t, ehs, pooled, ids)
                w = (x - mu_real).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-8)
                grad = torch.nan_to_num((mu_fake - mu_real) / w)
            loss = 0.5 * ((x - (x - grad).detach()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.G.parameters(), CLIP)
        self.opt_G.step()
        with torch.no_grad():
            d = min(0.999, (1 + self.n) / (10 + self.n))
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.G.parameters()), 1.0 - d)
        self.n += 1
        self.opt_fake.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (B,), device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        x = x.detach()
        x_t = a * x + s * torch.randn_like(x)
        with self.autocast():
            pred = self.x0(self.fake, x_t, t, ehs, pooled, ids)
            loss = ((a / s).flatten() ** 2 * ((pred - x) ** 2).mean((1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), CLIP)
        self.opt_fake.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default="none:default",
                   help="project variants COMPILE:CHANNELS_LAST (on, off or default), comma-separated")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sdxl_train_step.json"))
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    batches = [2] if args.tiny else [int(b) for b in args.batches.split(",")]
    warmup, iters = (1, 1) if args.tiny else (args.warmup, args.iters)
    teacher = build_teacher(args.tiny, device)
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "sample_shape": list(teacher.sample_shape),
              "unet_params": sum(p.numel() for p in teacher.net.parameters()), "cases": {}}
    for B in batches:
        row = result["cases"].setdefault(str(B), {})
        row["eager"] = run_case(lambda: EagerStep(teacher, B, device), warmup, iters, device)
        print(B, "eager", json.dumps(row["eager"]), flush=True)
        for variant in args.variants.split(","):
            mode, nhwc = variant.split(":")
            flag = {"on": True, "off": False, "default": None}[nhwc]
            name = f"project compile={mode} channels_last={nhwc}"
            row[name] = run_case(lambda: project_step(teacher, B, device, mode, flag), warmup, iters, device)
            print(B, name, json.dumps(row[name]), flush=True)
            if "ms_median" in row["eager"] and "ms_median" in row[name]:
                row[name]["over_eager"] = round(row[name]["ms_median"] / row["eager"]["ms_median"], 3)
        if all(r.get("oom") for r in row.values() if isinstance(r, dict)):
            break
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
