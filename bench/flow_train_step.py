"""One full-weight DMD step on a rectified-flow transformer (random weights): the SD3.5-Medium architecture (2.5 B,
CFG) or FLUX.1-dev's (12 B, embedded guidance), the project's trainer against a minimal eager loop doing the same
work, in one call, at growing batch until one runs out of memory.

python bench/flow_train_step.py --arch sd35m [--batches 1,2,4,8] [--iters 4] [--out OUT.json]
python bench/flow_train_step.py --arch flux  [--batches 1,2]
python bench/flow_train_step.py --arch sd35m --tiny   (CPU smoke run on the tiny SD3 layout, batch 2)
python bench/flow_train_step.py --arch flux --tiny    (CPU smoke run on the tiny FLUX.1-dev layout, batch 2)

Both sides: fp32 G and fake score (fused AdamW on CUDA, clip-norm 1, EMA of G), a bf16 frozen teacher, bf16
autocast, gradient checkpointing on the trained transformers; a generator update (one-step G at sigma 1 on B
prompts; the real score by CFG at w = 4 with batch doubling for SD3.5, or FLUX.1-dev at embedded guidance 3.5 with
the student and fake score taking the same input; fake score without grad; the DM loss) and a fake-score update
(flow-matching loss, x0-space weight 1 / sigma^2). No regression, no GAN. 128 x 128 latents (1024 px). The text
encoders have the real widths and two layers each (CLIP-L/G for SD3.5 with the no-T5 zeros; CLIP-L + T5-XXL width
for Flux): they run once per step on both sides.
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

from dmd_core.backbones import image_ids, pack_latents, unpack_latents  # noqa: E402
from dmd_core.conditions import Prompts  # noqa: E402
from dmd_core.denoisers import NetDenoiser  # noqa: E402
from dmd_core.processes import RectifiedFlow, flux_mu, shift_sigmas  # noqa: E402
from dmd_core.teachers import LatentCodec, Teacher  # noqa: E402
from dmd_core.tiny import (tiny_flux_components, tiny_sd3_components, write_byte_tokenizer,  # noqa: E402
                           write_character_t5_tokenizer)

LR, CLIP = 1e-6, 1.0
GUIDANCE = {"sd35m": 4.0, "flux": 3.5}


def real_components(arch: str) -> dict:
    """The transformer with the published config (stabilityai/stable-diffusion-3.5-medium or
    black-forest-labs/FLUX.1-dev), built in bf16 on the GPU; two-layer text encoders of the real widths."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        if arch == "sd35m":
            net = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                        qk_norm="rms_norm")
        else:
            net = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are FLUX.1-dev's
    net = net.to(torch.bfloat16)

    def clip(width, cls):
        return cls(CLIPTextConfig(vocab_size=514, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                                  num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=512,
                                  eos_token_id=513, pad_token_id=513, projection_dim=width, hidden_act="gelu"))

    vae = AutoencoderKL(latent_channels=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    if arch == "sd35m":
        return {"net": net, "vae": vae, "text_encoder": clip(768, CLIPTextModelWithProjection),
                "text_encoder_2": clip(1280, CLIPTextModelWithProjection)}
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64))
    return {"net": net, "vae": vae, "text_encoder": clip(768, CLIPTextModel), "text_encoder_2": t5.to(torch.bfloat16)}


def build_teacher(arch: str, tiny: bool, device: str) -> Teacher:
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = tempfile.mkdtemp(prefix="bench-tokenizers-")
    write_byte_tokenizer(os.path.join(folder, "clip"), max_length=77)
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "clip"))
    if tiny:
        parts = tiny_sd3_components() if arch == "sd35m" else tiny_flux_components()
        parts["net"] = parts.pop("transformer")
        parts.pop("scheduler")
    else:
        parts = real_components(arch)
    net, vae = parts["net"], parts["vae"]
    side = 8 if tiny else 128
    if arch == "sd35m":
        process = RectifiedFlow(shift=3.0, time_scale=1000.0)
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": clip_tok}
    else:
        process = RectifiedFlow(shift=float(torch.tensor(flux_mu((side // 2) ** 2)).exp()), time_scale=1.0,
                                dynamic=True, flux_grid=True)
        write_character_t5_tokenizer(os.path.join(folder, "t5"))
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": T5TokenizerFast.from_pretrained(os.path.join(folder, "t5"))}
    channels = int(net.config.in_channels) // (1 if arch == "sd35m" else 4)
    teacher = Teacher(kind="sd3" if arch == "sd35m" else "flux", denoiser=NetDenoiser(net, process, "flow_prediction"),
                      process=process, sample_shape=(channels, side, side), prediction_type="flow_prediction",
                      encoders={"text_encoder": parts["text_encoder"], "text_encoder_2": parts["text_encoder_2"]},
                      tokenizers=tokenizers, codec=LatentCodec(vae, 1.0))
    return teacher.to(device).frozen()


def fp32_copy(teacher: Teacher) -> NetDenoiser:
    return NetDenoiser(copy.deepcopy(teacher.net).float().requires_grad_(True).train(), teacher.process,
                       "flow_prediction")


def project_step(arch: str, teacher: Teacher, batch: int, device: str):
    """The project's path: DMDTrainer.train_step (one G update + one fake update)."""
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer

    cfg = DistillConfig(batch_size=batch, regression="none", guidance=GUIDANCE[arch], lr=LR, grad_clip=CLIP, bf16=True,
                        gradient_checkpointing=True, generator_timesteps=[1000], compile="none")
    trainer = DMDTrainer(cfg, teacher, conditions=Prompts(PROMPTS), generator_init=fp32_copy(teacher),
                         fake_init=fp32_copy(teacher), device=device)
    return trainer.train_step


class EagerStep:
    """The same step with plain torch and the diffusers transformers: nothing from dmd_core's trainer or denoiser."""

    def __init__(self, arch: str, teacher: Teacher, batch: int, device: str) -> None:
        self.arch, self.dev, self.B, self.shape, self.teacher = arch, torch.device(device), batch, teacher.sample_shape, teacher
        self.w, self.shift = GUIDANCE[arch], teacher.process.shift
        self.real = teacher.net
        self.G = copy.deepcopy(self.real).float().requires_grad_(True).train()
        self.fake = copy.deepcopy(self.real).float().requires_grad_(True).train()
        for net in (self.G, self.fake):
            net.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        adam = dict(lr=LR, betas=(0.9, 0.999), weight_decay=0.01, fused=self.dev.type == "cuda")
        self.opt_G = torch.optim.AdamW(self.G.parameters(), **adam)
        self.opt_fake = torch.optim.AdamW(self.fake.parameters(), **adam)
        self.n = 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict:
        """The stock pipelines' encode_prompt (SD3: CLIP states padded + no-T5 zeros, pooled concat; Flux: CLIP pooled,
        T5 states)."""
        T = self.teacher
        ids = [T.tokenizers[k](prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids.to(self.dev) for k in ("tokenizer",)]
        if self.arch == "sd35m":
            outs = [T.encoders[k](ids[0], output_hidden_states=True) for k in ("text_encoder", "text_encoder_2")]
            states = torch.cat([o.hidden_states[-2] for o in outs], -1)
            width = self.real.config.joint_attention_dim
            states = torch.nn.functional.pad(states, (0, width - states.shape[-1]))
            zeros = torch.zeros(len(prompts), 256, width, device=self.dev, dtype=states.dtype)
            return {"encoder_hidden_states": torch.cat([states, zeros], 1),
                    "pooled_projections": torch.cat([o[0] for o in outs], -1)}
        t5_ids = T.tokenizers["tokenizer_2"](prompts, padding="max_length", max_length=512, truncation=True,
                                             return_tensors="pt").input_ids.to(self.dev)
        return {"encoder_hidden_states": T.encoders["text_encoder_2"](t5_ids)[0],
                "pooled_projections": T.encoders["text_encoder"](ids[0]).pooler_output}

    def x0(self, net, x_t, sigma, cond):
        """x0 = x_t - sigma v (flow velocity); Flux packs 2 x 2 tokens and takes the guidance input."""
        s = sigma.view(-1, 1, 1, 1)
        if self.arch == "sd35m":
            v = net(hidden_states=x_t, timestep=1000 * sigma, **cond).sample
        else:
            H, W = x_t.shape[-2:]
            text = cond["encoder_hidden_states"]
            guidance = torch.full((x_t.shape[0],), self.w, device=self.dev)
            v = unpack_latents(net(hidden_states=pack_latents(x_t), timestep=sigma, guidance=guidance,
                                   img_ids=image_ids(H, W, x_t), txt_ids=torch.zeros(text.shape[1], 3, device=self.dev),
                                   **cond).sample, H, W)
        return x_t - s * v.float()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda")

    def __call__(self) -> None:
        B, dev = self.B, self.dev
        cond = self.encode([PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (B,)).tolist()])
        z = torch.randn(B, *self.shape, device=dev)
        u = torch.randint(20, 980, (B,), device=dev) / 1000
        sigma = shift_sigmas(u, self.shift).float()
        eps = torch.randn(B, *self.shape, device=dev)
        s = sigma.view(-1, 1, 1, 1)
        self.opt_G.zero_grad(set_to_none=True)
        with self.autocast():
            x = self.x0(self.G, z, torch.ones(B, device=dev), cond)
            with torch.no_grad():
                x_t = (1 - s) * x + s * eps
                if self.arch == "sd35m":  # CFG by batch doubling, the empty prompt's condition as null
                    null = {k: v.expand(B, *v.shape[1:]) for k, v in self.encode([""]).items()}
                    both = {k: torch.cat([null[k], cond[k]]) for k in cond}
                    uncond, c = self.x0(self.real, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both).chunk(2)
                    mu_real = uncond + self.w * (c - uncond)
                else:
                    mu_real = self.x0(self.real, x_t, sigma, cond)
                mu_fake = self.x0(self.fake, x_t, sigma, cond)
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
        sigma = shift_sigmas(torch.randint(0, 1000, (B,), device=dev) / 1000, self.shift).float().clamp_min(1e-3)
        s = sigma.view(-1, 1, 1, 1)
        x = x.detach()
        x_t = (1 - s) * x + s * torch.randn_like(x)
        with self.autocast():
            pred = self.x0(self.fake, x_t, sigma, cond)
            loss = (((pred - x) ** 2).mean((1, 2, 3)) / sigma**2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), CLIP)
        self.opt_fake.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["sd35m", "flux"], default="sd35m")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"flow_train_step_{args.arch}.json")
    device = "cpu" if args.tiny else "cuda"
    batches = [2] if args.tiny else [int(b) for b in args.batches.split(",")]
    warmup, iters = (1, 1) if args.tiny else (args.warmup, args.iters)
    teacher = build_teacher(args.arch, args.tiny, device)
    result = {"arch": args.arch, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "sample_shape": list(teacher.sample_shape),
              "transformer_params": sum(p.numel() for p in teacher.net.parameters()), "cases": {}}
    for B in batches:
        row = result["cases"].setdefault(str(B), {})
        row["eager"] = run_case(lambda: EagerStep(args.arch, teacher, B, device), warmup, iters, device)
        print(B, "eager", json.dumps(row["eager"]), flush=True)
        row["project"] = run_case(lambda: project_step(args.arch, teacher, B, device), warmup, iters, device)
        print(B, "project", json.dumps(row["project"]), flush=True)
        if "ms_median" in row["eager"] and "ms_median" in row["project"]:
            row["project_over_eager"] = round(row["project"]["ms_median"] / row["eager"]["ms_median"], 3)
        if all(r.get("oom") for r in (row["eager"], row["project"])):
            break
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
