"""One DMD training step on the SD1.5 architecture (random weights): the project's trainer against an eager loop.

python bench/sd15_train_step.py [--batches 8,16] [--iters 8] [--warmup 2] [--out OUT.json]
torchrun --nproc_per_node 2 bench/sd15_train_step.py --paths project --batches 32
                                           (DDP: `DDPTrainer`, each batch per GPU, global batch x world size;
                                            rank 0 writes the JSON, with every rank's peak memory)
python bench/sd15_train_step.py --tiny     (CPU smoke run on `dmd_core.tiny` components, batch 2, 2 iterations)
python bench/sd15_train_step.py --profile  (after warm-up, one step of each path under torch.profiler: kernel
                                            time against wall time, kernel count, top-op tables to --out's folder)

Both sides do the same work per step, in bf16 autocast with gradient checkpointing on the trained UNets:
a generator update (one-step G on B prompts, CFG real score by batch doubling, fake score without grad,
LPIPS regression on B/2 pairs through a 512x512 VAE decode with grad, AdamW, clip-norm 10, EMA) and a
fake-score update (denoising loss, AdamW, clip-norm 10). Fresh noise, prompts and pairs every step.
Writes JSON to --out (default $OUT/sd15_train_step.json) and prints it.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dmd_core.conditions import Prompts  # noqa: E402
from dmd_core.denoisers import NetDenoiser  # noqa: E402
from dmd_core.teachers import LatentCodec, Teacher, vp_process  # noqa: E402
from dmd_core.tiny import SD_SCHEDULER, tiny_sd_components, write_byte_tokenizer  # noqa: E402

PROMPTS = ["a photo of a cat sitting on a windowsill", "a red bus driving down a city street",
           "two people riding horses on a beach at sunset", "a bowl of fruit on a wooden table",
           "an airplane flying over snowy mountains", "a kitchen with white cabinets and a stove",
           "a dog catching a frisbee in a park", "a plate of pasta with tomato sauce"]
GUIDANCE, LAMBDA_REG, LR, CLIP = 3.0, 0.25, 5e-5, 10.0


def sd15_components() -> dict:
    """UNet2DConditionModel, AutoencoderKL and CLIPTextModel with Stable Diffusion 1.5's configs, random init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    # CLIP ViT-L/14 text tower; bos/eos/pad are the byte tokenizer's ids (all < 49408).
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=512, eos_token_id=513,
        pad_token_id=513))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_teacher(tiny: bool, device: str, decoder: str = "full") -> Teacher:
    from diffusers import AutoencoderTiny
    from transformers import CLIPTokenizer

    parts = tiny_sd_components(latent_size=8) if tiny else sd15_components()
    folder = tempfile.mkdtemp(prefix="byte-tokenizer-")
    write_byte_tokenizer(folder, max_length=77)
    process = vp_process(SD_SCHEDULER)
    unet = parts["unet"]
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    codec = LatentCodec(parts["vae"], float(parts["vae"].config.scaling_factor),
                        decoder=AutoencoderTiny() if decoder == "tiny" else None)
    teacher = Teacher(kind="sd", denoiser=NetDenoiser(unet, process, "epsilon"), process=process,
                      sample_shape=shape, prediction_type="epsilon",
                      encoders={"text_encoder": parts["text_encoder"]},
                      tokenizers={"tokenizer": CLIPTokenizer.from_pretrained(folder)}, codec=codec,
                      scheduler_config=dict(SD_SCHEDULER))
    return teacher.to(device).frozen()


class RandomPairs:
    """A pair stream of fresh random (z, y, prompts) batches: the shapes of a real pair set, no file."""

    def __init__(self, batch_size: int, shape: tuple, prompts: list[str]) -> None:
        self.batch_size, self.shape, self.prompts, self.calls = batch_size, tuple(shape), prompts, 0

    def next_batch(self, device: torch.device | str = "cpu") -> dict:
        self.calls += 1
        n = self.batch_size
        idx = torch.randint(0, len(self.prompts), (n,)).tolist()
        return {"z": torch.randn(n, *self.shape, device=device), "y": torch.randn(n, *self.shape, device=device),
                "cond": [self.prompts[i] for i in idx]}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


COMPILE, COMPILE_SCOPE = "none", "auto"


def project_step(teacher: Teacher, lpips_model, batch: int, device: str):
    """The project's path: DMDTrainer.train_step (one G update + one fake update)."""
    from dmd_core.config import DistillConfig
    from dmd_core.trainer import DMDTrainer

    W = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun: `batch` per GPU, DDPTrainer on the global batch
    reg = max(batch // 2, 1)
    cfg = DistillConfig(batch_size=batch * W, regression="lpips", reg_batch_size=reg * W, lpips_random_trunk=True,
                        guidance=GUIDANCE, lambda_reg=LAMBDA_REG, lr=LR, grad_clip=CLIP, bf16=True,
                        gradient_checkpointing=True, generator_timesteps=[999], compile=COMPILE,
                        compile_scope=COMPILE_SCOPE, world_size=W)
    cls = DMDTrainer
    if W > 1:
        from dmd_core.distributed import DDPTrainer as cls
    trainer = cls(cfg, teacher, conditions=Prompts(PROMPTS),
                  pairs=RandomPairs(reg * W, teacher.sample_shape, PROMPTS), lpips_model=lpips_model, device=device)
    return trainer.train_step


class EagerStep:
    """The same step written out with plain torch and diffusers modules, nothing from dmd_core's trainer."""

    def __init__(self, teacher: Teacher, lpips_model, batch: int, device: str) -> None:
        self.dev, self.B, self.R = torch.device(device), batch, max(batch // 2, 1)
        self.shape = teacher.sample_shape
        self.real, self.lpips = teacher.net, lpips_model
        self.vae = teacher.codec.decoder if teacher.codec.decoder is not None else teacher.vae  # the regression's decoder
        self.tok, self.clip = teacher.tokenizer, teacher.text_encoder
        self.G = copy.deepcopy(self.real).requires_grad_(True).train()
        self.fake = copy.deepcopy(self.real).requires_grad_(True).train()
        for unet in (self.G, self.fake):
            unet.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.G).requires_grad_(False).eval()
        adam = dict(lr=LR, betas=(0.9, 0.999), weight_decay=0.01)
        self.opt_G = torch.optim.AdamW(self.G.parameters(), **adam)
        self.opt_fake = torch.optim.AdamW(self.fake.parameters(), **adam)
        abar = teacher.process.alphas_cumprod.float().to(self.dev)
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.null = self.encode([""])
        self.n = 0

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tok(prompts, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(self.dev)
        return self.clip(ids)[0]

    def x0(self, unet, x_t: torch.Tensor, t: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        eps = unet(x_t, t, encoder_hidden_states=ehs).sample.float()
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        return (x_t - s * eps) / a

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.dev.type == "cuda")

    def prompts(self, n: int) -> list[str]:
        return [PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (n,)).tolist()]

    def __call__(self) -> None:
        B, R, dev = self.B, self.R, self.dev
        z, ehs = torch.randn(B, *self.shape, device=dev), self.encode(self.prompts(B))
        z_reg, y_reg = torch.randn(R, *self.shape, device=dev), torch.randn(R, *self.shape, device=dev)
        t999 = torch.full((B,), 999, device=dev)
        t, eps = torch.randint(20, 980, (B,), device=dev), torch.randn(B, *self.shape, device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        self.opt_G.zero_grad(set_to_none=True)
        with self.autocast():
            x = self.x0(self.G, z, t999, ehs)
            with torch.no_grad():
                x_t = a * x + s * eps
                null = self.null.expand(B, -1, -1)
                uncond, cond = self.x0(self.real, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                       torch.cat([null, ehs])).chunk(2)
                mu_real = uncond + GUIDANCE * (cond - uncond)
                mu_fake = self.x0(self.fake, x_t, t, ehs)
                w = (x - mu_real).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-8)
                grad = torch.nan_to_num((mu_fake - mu_real) / w)
            loss_dm = 0.5 * ((x - (x - grad).detach()) ** 2).mean()
            x_ref = self.x0(self.G, z_reg, t999[:R], self.encode(self.prompts(R)))
            sf = self.vae.config.scaling_factor
            with torch.no_grad():
                img_y = self.vae.decode(y_reg / sf).sample
            img_x = self.vae.decode(x_ref / sf).sample
            size = dict(size=(224, 224), mode="bilinear", align_corners=False)
            loss_reg = self.lpips(F.interpolate(img_x.float(), **size), F.interpolate(img_y.float(), **size)).mean()
            loss_G = loss_dm + LAMBDA_REG * loss_reg
        loss_G.backward()
        torch.nn.utils.clip_grad_norm_(self.G.parameters(), CLIP)
        self.opt_G.step()
        with torch.no_grad():
            d = min(0.999, (1 + self.n) / (10 + self.n))
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.G.parameters()), 1.0 - d)
        self.n += 1
        self._fake_update(x.detach(), ehs)

    def _fake_update(self, x: torch.Tensor, ehs: torch.Tensor) -> None:
        B = x.shape[0]
        self.opt_fake.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (B,), device=self.dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        x_t = a * x + s * torch.randn_like(x)
        with self.autocast():
            pred = self.x0(self.fake, x_t, t, ehs)
            snr = (a / s).flatten() ** 2
            loss = (snr * ((pred - x) ** 2).mean((1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), CLIP)
        self.opt_fake.step()


def _gb(n: int) -> float:
    return round(n / 2**30, 2)


def measure(build, warmup: int, iters: int, device: str) -> dict:
    """Build a step, run warm-up steps, then time `iters` steps (CUDA events on a GPU); memory in GiB."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    step = build()
    built_s = time.perf_counter() - t0
    built = torch.cuda.memory_allocated() if cuda else 0
    times, warm = [], []
    for i in range(warmup + iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step()
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(round(ms, 2))
        else:
            warm.append(round(ms, 1))
    out = {"ms_median": round(statistics.median(times), 1), "ms_min": min(times), "ms_max": max(times),
           "ms_all": times, "warmup_ms": warm, "build_s": round(built_s, 1)}
    if cuda:
        out.update(peak_GB=_gb(torch.cuda.max_memory_allocated()),
                   reserved_peak_GB=_gb(torch.cuda.max_memory_reserved()), before_build_GB=_gb(base),
                   after_build_GB=_gb(built),
                   after_steps_GB=_gb(torch.cuda.memory_allocated()))
    return out


def profile(build, warmup: int, device: str, table_path: str) -> dict:
    """One step under torch.profiler after warm-up: wall time, summed kernel time, kernel launches (calls)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = build()
    for _ in range(warmup):
        step()
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    # Device-side events minus user-annotation ranges (Optimizer.step#...), as the profiler's own total counts.
    kernels = [e for e in events if str(e.device_type).endswith("CUDA") and not getattr(e, "is_user_annotation", False)]
    with open(table_path, "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
        f.write("\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90))
    return {"wall_ms": round(1e3 * wall, 1),
            "device_kernel_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 1),
            "kernel_launches": sum(e.count for e in kernels)}


def run_case(build, warmup: int, iters: int, device: str, table_path: str = "") -> dict:
    try:
        result = profile(build, warmup, device, table_path) if table_path else measure(build, warmup, iters, device)
    except torch.OutOfMemoryError as err:
        result = {"oom": True, "error": str(err).splitlines()[0][:300]}
        if device == "cuda":
            result["peak_GB"] = _gb(torch.cuda.max_memory_allocated())
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny components")
    p.add_argument("--batches", default="8,16")
    p.add_argument("--paths", default="project,eager")
    p.add_argument("--profile", action="store_true", help="profile one step of each path instead of timing")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--decoder", default="full", choices=["full", "tiny"], help="regression decoder (tiny: AutoencoderTiny)")
    p.add_argument("--compile", default="none", help="distill.compile of the project path")
    p.add_argument("--compile-scope", default="auto", help="distill.compile_scope of the project path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sd15_train_step.json"))
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    batches = [2] if args.tiny else [int(b) for b in args.batches.split(",")]
    warmup, iters = (1, 2) if args.tiny else (args.warmup, args.iters)
    from dmd_core.perceptual import build_lpips

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        from dmd_core.distributed import init_process_group
        init_process_group(device)
    t0 = time.time()
    global COMPILE, COMPILE_SCOPE
    COMPILE, COMPILE_SCOPE = args.compile, args.compile_scope
    teacher = build_teacher(args.tiny, device, args.decoder)
    lpips_model = build_lpips("vgg", random_trunk=True).to(device)
    n_unet = sum(p.numel() for p in teacher.net.parameters())
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "tiny": args.tiny, "sample_shape": list(teacher.sample_shape),
              "unet_params": n_unet, "vae_params": sum(p.numel() for p in teacher.vae.parameters()),
              "text_encoder_params": sum(p.numel() for p in teacher.text_encoder.parameters()),
              "build_s": round(time.time() - t0, 1), "warmup": warmup, "iters": iters, "runs": []}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    result["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    result["decoder"], result["compile"], result["compile_scope"] = args.decoder, args.compile, args.compile_scope
    for B in batches:
        paths = {"project": lambda: project_step(teacher, lpips_model, B, device),
                 "eager": lambda: EagerStep(teacher, lpips_model, B, device)}
        for name in args.paths.split(","):
            table = os.path.join(out_dir, f"profile_{name}_{B}.txt") if args.profile else ""
            r = run_case(paths[name], warmup, iters, device, table)
            if world > 1:  # every rank's peak, on rank 0
                import torch.distributed as dist
                peaks = [None] * world
                dist.all_gather_object(peaks, r.get("peak_GB"))
                r.update(world_size=world, global_batch=B * world, peak_GB_per_rank=peaks)
            result["runs"].append({"batch": B, "reg_batch": max(B // 2, 1), "path": name, **r})
            print(json.dumps(result["runs"][-1]), flush=True)
            if world == 1 or int(os.environ.get("RANK", 0)) == 0:  # after every case: a later one may not finish
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=2)
        runs = {r["path"]: r for r in result["runs"] if r["batch"] == B}
        if all("ms_median" in runs.get(k, {}) for k in ("project", "eager")):
            ratio = runs["project"]["ms_median"] / runs["eager"]["ms_median"]
            result.setdefault("ratio_project_over_eager", {})[str(B)] = round(ratio, 3)
    if world > 1 and int(os.environ.get("RANK", 0)) != 0:
        return
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
