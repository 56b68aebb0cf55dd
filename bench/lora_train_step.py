"""LoRA students (`distill.lora_rank`) on real architectures (random weights, bf16, gradient checkpointing), each
part against its baseline in the same call:

- sd15: the SD1.5-architecture step of bench/sd15_train_step.py (LPIPS regression) with full-weight students
  against LoRA students at equal batch: peak memory.
- sdxl: an SDXL-architecture DMD2 step (no regression; one generator and one fake-score update; with and
  without the GAN head on the fake score's bottleneck) with LoRA students, against a naive peft loop doing the
  same DM work: G and the fake score as two peft adapters of one bf16 UNet switched with `set_adapter` /
  `disable_adapters`, eager, unfused AdamW. Images/s and peak memory.
- flux: a FLUX.1-dev-architecture (12 B) LoRA DMD step, the transformer built on the meta device and
  materialised in bf16 on the GPU (no fp32 copy ever exists): batch and peak memory.

python bench/lora_train_step.py [--parts sd15,sdxl,flux] [--rank 64] [--out OUT.json]
python bench/lora_train_step.py --tiny     (CPU smoke run of every part on the tiny layouts)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import sys
import traceback
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flow_train_step  # noqa: E402
import sd15_train_step  # noqa: E402
import sdxl_train_step  # noqa: E402
from sd15_train_step import PROMPTS, RandomPairs, run_case  # noqa: E402

from dmd_core.backbones import UNET_LORA_TARGETS  # noqa: E402
from dmd_core.conditions import Prompts  # noqa: E402
from dmd_core.config import DistillConfig  # noqa: E402
from dmd_core.trainer import DMDTrainer  # noqa: E402

RESULT: dict = {}
OUT = ""


def save() -> None:
    """Write what is measured so far: a later case may not finish within the call."""
    with open(OUT, "w") as f:
        json.dump(RESULT, f, indent=2)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sd15: full weights against LoRA at equal batch
def sd15_project(teacher, lpips_model, batch: int, device: str, rank: int):
    """bench/sd15_train_step.py's project step, with `lora_rank` (0: full-weight students)."""
    reg = max(batch // 2, 1)
    cfg = DistillConfig(batch_size=batch, regression="lpips", reg_batch_size=reg, lpips_random_trunk=True,
                        guidance=sd15_train_step.GUIDANCE, lambda_reg=sd15_train_step.LAMBDA_REG,
                        lr=sd15_train_step.LR, grad_clip=sd15_train_step.CLIP, bf16=True, gradient_checkpointing=True,
                        generator_timesteps=[999], compile="none", lora_rank=rank)
    trainer = DMDTrainer(cfg, teacher, conditions=Prompts(PROMPTS), pairs=RandomPairs(reg, teacher.sample_shape, PROMPTS),
                         lpips_model=lpips_model, device=device)
    return trainer.train_step


def part_sd15(args, device: str, out: dict) -> None:
    from dmd_core.perceptual import build_lpips

    teacher = sd15_train_step.build_teacher(args.tiny, device)
    lpips_model = build_lpips("vgg", random_trunk=True).to(device)
    for B in args.sd15_batches:
        row = out.setdefault(str(B), {})
        # Full weights first: the LoRA run turns the teacher's UNet into its shared bf16 base in place.
        row["full"] = run_case(lambda: sd15_project(teacher, lpips_model, B, device, 0), args.warmup, args.iters, device)
        print("sd15", B, "full", json.dumps(row["full"]), flush=True)
        save()
    for B in args.sd15_batches:
        row = out[str(B)]
        row["lora"] = run_case(lambda: sd15_project(teacher, lpips_model, B, device, args.rank), args.warmup,
                               args.iters, device)
        print("sd15", B, "lora", json.dumps(row["lora"]), flush=True)
        if "peak_GB" in row["lora"] and "peak_GB" in row["full"] and not row["full"].get("oom"):
            row["lora_peak_over_full"] = round(row["lora"]["peak_GB"] / row["full"]["peak_GB"], 3)
        save()
    del teacher, lpips_model
    free()


# ---------------------------------------------------------------- sdxl: DMD2 with LoRA against a naive peft loop
class NaivePeftStep(sdxl_train_step.EagerStep):
    """bench/sdxl_train_step.py's eager step with G and the fake score as two peft adapters of one bf16 UNet (the
    real score: adapters disabled), switched per call; EMA over G's adapter; plain AdamW."""

    def __init__(self, teacher, batch: int, device: str, rank: int, fp32_adapters: bool = False) -> None:
        from peft import LoraConfig

        self.dev, self.B, self.shape, self.teacher = torch.device(device), batch, teacher.sample_shape, teacher
        self.unet = copy.deepcopy(teacher.net)
        targets = list(UNET_LORA_TARGETS)  # the layers the project's LoRA adapts: equal work
        for name in ("G", "fake"):
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                             init_lora_weights="gaussian"), adapter_name=name)
        self.unet.enable_gradient_checkpointing()
        self.params = {name: [p for n, p in self.unet.named_parameters() if f".{name}." in n and "lora_" in n]
                       for name in ("G", "fake")}
        for ps in self.params.values():
            for p in ps:
                p.requires_grad_(True)
                if fp32_adapters:  # add_adapter holds them in the base's bf16; peft's trainers cast them to fp32
                    p.data = p.data.float()
        self.ema = [p.detach().clone() for p in self.params["G"]]
        self.opt_G = torch.optim.AdamW(self.params["G"], lr=sdxl_train_step.LR, weight_decay=0.01)
        self.opt_fake = torch.optim.AdamW(self.params["fake"], lr=sdxl_train_step.LR, weight_decay=0.01)
        abar = teacher.process.alphas_cumprod.float().to(self.dev)
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.n = 0

    def use(self, name):
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)
            for p in self.params["G"] + self.params["fake"]:  # set_adapter freezes the other adapter
                p.requires_grad_(True)
        return self.unet

    def __call__(self) -> None:
        B, dev, w = self.B, self.dev, sdxl_train_step.GUIDANCE
        prompts = [PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (B,)).tolist()]
        ehs, pooled, ids = self.encode(prompts)
        z = torch.randn(B, *self.shape, device=dev)
        t_star = torch.full((B,), sdxl_train_step.T_STAR, device=dev)
        t, eps = torch.randint(20, 980, (B,), device=dev), torch.randn(B, *self.shape, device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        self.opt_G.zero_grad(set_to_none=True)
        with self.autocast():
            x = self.x0(self.use("G"), z, t_star, ehs, pooled, ids)
            with torch.no_grad():
                x_t = a * x + s * eps
                cat = lambda v: torch.cat([torch.zeros_like(v), v])  # noqa: E731  the zero null condition
                uncond, cond = self.x0(self.use(None), torch.cat([x_t, x_t]), torch.cat([t, t]), cat(ehs),
                                       cat(pooled), torch.cat([ids, ids])).chunk(2)
                mu_real = uncond + w * (cond - uncond)
                mu_fake = self.x0(self.use("fake"), x_t, t, ehs, pooled, ids)
                weight = (x - mu_real).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-8)
                grad = torch.nan_to_num((mu_fake - mu_real) / weight)
            loss = 0.5 * ((x - (x - grad).detach()) ** 2).mean()
        self.use("G")  # the checkpointed blocks recompute under the adapter active at backward time
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params["G"], sdxl_train_step.CLIP)
        self.opt_G.step()
        with torch.no_grad():
            d = min(0.999, (1 + self.n) / (10 + self.n))
            torch._foreach_lerp_(self.ema, self.params["G"], 1.0 - d)
        self.n += 1
        self.opt_fake.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (B,), device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        x = x.detach()
        x_t = a * x + s * torch.randn_like(x)
        with self.autocast():
            pred = self.x0(self.use("fake"), x_t, t, ehs, pooled, ids)
            loss = ((a / s).flatten() ** 2 * ((pred - x) ** 2).mean((1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params["fake"], sdxl_train_step.CLIP)
        self.opt_fake.step()


def sdxl_project(teacher, batch: int, device: str, rank: int, compile: str, gan: bool,
                 channels_last: Optional[bool] = None, compile_scope: str = "auto"):
    """DMDTrainer with LoRA students: DMD2 (no regression), one G and one fake-score update a step."""
    cfg = DistillConfig(batch_size=batch, regression="none", guidance=sdxl_train_step.GUIDANCE, lr=sdxl_train_step.LR,
                        grad_clip=sdxl_train_step.CLIP, bf16=True, gradient_checkpointing=True,
                        generator_timesteps=[sdxl_train_step.T_STAR], compile=compile, lora_rank=rank,
                        gan={"enabled": gan}, channels_last=channels_last, compile_scope=compile_scope)
    real = RandomPairs(batch, teacher.sample_shape, PROMPTS) if gan else None
    trainer = DMDTrainer(cfg, teacher, conditions=Prompts(PROMPTS), real=real, device=device)
    return trainer.train_step


def images_per_s(r: dict, batch: int) -> None:
    if "ms_median" in r:
        r["images_per_s"] = round(batch / (r["ms_median"] / 1e3), 2)


SDXL_COMPONENTS = sdxl_train_step.sdxl_components


def meta_sdxl_components() -> dict:
    """bench/sdxl_train_step.py's components with the UNet built on the meta device and drawn in bf16 on the GPU:
    a fresh UNet per case in seconds."""
    with torch.device("meta"):
        unet = sdxl_train_step.sdxl_unet()
    return SDXL_COMPONENTS(unet=init_on_device(unet, "cuda", torch.bfloat16))


def part_sdxl(args, device: str, out: dict) -> None:
    B = out["batch"] = args.sdxl_batch
    if not args.tiny:
        sdxl_train_step.sdxl_components = meta_sdxl_components
    # name: naive peft loop (fp32 adapters?) or the project trainer (compile, GAN head, channels_last)
    cases = {"naive_peft": dict(fp32_adapters=False), "naive_peft fp32": dict(fp32_adapters=True),
             "project": dict(compile="none", gan=False), "project nchw": dict(compile="none", gan=False,
                                                                               channels_last=False),
             "project gan": dict(compile="none", gan=True),
             "project compile": dict(compile=args.compile, gan=False, compile_scope=args.compile_scope)}
    names = args.sdxl_cases.split(",")
    if args.compile != "none" and "project compile" not in names:
        names.append("project compile")
    for name in names:
        # A fresh teacher a case: peft and the LoRA trainer both adapt the teacher's UNet in place.
        teacher = sdxl_train_step.build_teacher(args.tiny, device)
        if name.startswith("naive_peft"):
            build = lambda: NaivePeftStep(teacher, B, device, args.rank, **cases[name])  # noqa: E731
        else:
            build = lambda: sdxl_project(teacher, B, device, args.rank, **cases[name])  # noqa: E731
        out[name] = run_case(build, args.warmup, args.iters, device)
        images_per_s(out[name], B)
        if name != "naive_peft" and "images_per_s" in out[name] and "images_per_s" in out.get("naive_peft", {}):
            out[name]["speed_over_naive"] = round(out[name]["images_per_s"] / out["naive_peft"]["images_per_s"], 3)
        print("sdxl", name, json.dumps(out[name]), flush=True)
        del teacher, build
        free()
        save()


# ---------------------------------------------------------------- flux: 12 B LoRA on one GPU, built on meta
def init_on_device(module: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Materialise a meta-device module in `dtype` on `device` and draw its weights there: matrices and kernels
    N(0, 1 / fan_in), norm scales 1, biases 0. Nothing exists in fp32 or on the CPU."""
    module = module.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    if list(module.buffers()):
        raise RuntimeError("init_on_device: the module has buffers to initialise")
    return module


def meta_components(arch: str) -> dict:
    """FLUX.1-dev's transformer built on the meta device, then bf16 on the GPU; bench/flow_train_step.py's
    two-layer text encoders of the real widths."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(guidance_embeds=True)
    net = init_on_device(net, "cuda", torch.bfloat16)
    parts = flux_text_parts()
    parts["net"] = net
    return parts


def flux_text_parts() -> dict:
    """bench/flow_train_step.py's Flux text encoders and VAE (small), without building the transformer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513, projection_dim=768, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64))
    vae = AutoencoderKL(latent_channels=16, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    return {"vae": vae, "text_encoder": clip, "text_encoder_2": t5.to(torch.bfloat16)}


def flux_project(teacher, batch: int, device: str, rank: int):
    cfg = DistillConfig(batch_size=batch, regression="none", guidance=flow_train_step.GUIDANCE["flux"],
                        lr=flow_train_step.LR, grad_clip=flow_train_step.CLIP, bf16=True, gradient_checkpointing=True,
                        generator_timesteps=[1000], compile="none", lora_rank=rank)
    trainer = DMDTrainer(cfg, teacher, conditions=Prompts(PROMPTS), device=device)
    return trainer.train_step


def part_flux(args, device: str, out: dict) -> None:
    if not args.tiny:
        flow_train_step.real_components = meta_components
        torch.cuda.reset_peak_memory_stats()
        # torch 2.11's cuDNN attention failed in this step's backward on an H100 (`mha_graph.execute(...)
        # .is_good()`, then an illegal memory access): the flash and memory-efficient kernels take its place.
        torch.backends.cuda.enable_cudnn_sdp(False)
        out["cudnn_sdp"] = False
    for B in args.flux_batches:
        teacher = flow_train_step.build_teacher("flux", args.tiny, device)  # a LoRA trainer adapts it in place
        out["transformer_params"] = sum(p.numel() for p in teacher.net.parameters())
        if device == "cuda" and "build_peak_GB" not in out:
            out["build_peak_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[str(B)] = r = run_case(lambda: flux_project(teacher, B, device, args.rank), args.warmup, args.iters, device)
        images_per_s(r, B)
        print("flux", B, json.dumps(r), flush=True)
        del teacher
        free()
        save()
        if r.get("oom"):
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--parts", default="sd15,sdxl,flux")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--sd15-batches", default="8")
    p.add_argument("--sdxl-batch", type=int, default=16)
    p.add_argument("--flux-batches", default="2")
    p.add_argument("--sdxl-cases", default="naive_peft,project,project gan",
                   help="of naive_peft, naive_peft fp32, project, project nchw, project gan")
    p.add_argument("--compile", default="default", help="distill.compile of the compiled SDXL case")
    p.add_argument("--compile-scope", default="auto", help="distill.compile_scope of the compiled SDXL case")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lora_train_step.json"))
    args = p.parse_args()
    global OUT
    OUT = args.out
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.sd15_batches, args.sdxl_batch, args.flux_batches, args.iters, args.warmup = [2], 2, [2], 1, 1
        args.rank, args.compile = 4, "none"
    else:
        args.sd15_batches = [int(b) for b in args.sd15_batches.split(",")]
        args.flux_batches = [int(b) for b in args.flux_batches.split(",")]
    RESULT.update(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.date.today().isoformat(), rank=args.rank, iters=args.iters, warmup=args.warmup,
                  compile_scope=args.compile_scope)
    parts = {"sd15": part_sd15, "sdxl": part_sdxl, "flux": part_flux}
    for name in args.parts.split(","):
        RESULT[name] = {}
        try:
            parts[name](args, device, RESULT[name])
        except Exception as err:  # a failing part must not lose the others' numbers
            RESULT[name]["error"] = f"{type(err).__name__}: {err}"[:500]
            print(name, "failed:", RESULT[name]["error"], flush=True)
            traceback.print_exc()
            save()
        free()
        save()
    print(json.dumps(RESULT, indent=2))


if __name__ == "__main__":
    main()
