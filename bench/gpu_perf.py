"""GPU speed of the project's paths against plain baselines measured in the same process (CUDA only).

python bench/gpu_perf.py [--sections train,pairs,infer] [--out OUT.json] [--quick]

- train: `DMDTrainer.train_step` on the google/ddpm-cifar10-32 architecture (35.7 M parameters, random weights),
  batch 64, bf16 autocast, DM + MSE regression, against a plain eager loop doing the same work; the project runs
  with `distill.compile` none / default / reduce-overhead. The first steps' losses of the compiled trainer are
  compared with the eager trainer's from the same initial state.
- pairs: the pairs stage (plan, shard tasks two at a time as the flow's thread pool runs them, shard writing,
  manifest) against a bare bf16 DDIM-50 loop, same teacher, batch and number of pairs.
- infer: one-step 512x512 generation on the SD1.5 architecture (UNet + full VAE decode, and the tiny decoder),
  the eager fp16 path against `dmd_core.inference.fast_pipeline` (fp16, channels_last, fused QKV, torch.compile),
  batch 1 and 16; outputs compared.
Times are CUDA-event medians after warm-up, fresh random inputs each iteration. Writes JSON to --out
(default $OUT/gpu_perf.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None)
CIFAR_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                   "num_train_timesteps": 1000, "clip_sample": True, "variance_type": "fixed_small"}


def timed(fn, iters: int, warmup: int) -> dict:
    """CUDA-event times (ms) of `fn()` after `warmup` calls; the warm-up wall time is reported as well."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters,
            "warmup_s": round(warm, 2)}


def cifar_teacher(device: str):
    from diffusers import UNet2DModel

    from dmd_core.denoisers import NetDenoiser
    from dmd_core.teachers import Teacher, vp_process

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_UNET)
    process = vp_process(CIFAR_SCHEDULER)
    return Teacher(kind="unet2d", denoiser=NetDenoiser(unet, process, "epsilon"), process=process,
                   sample_shape=(3, 32, 32), prediction_type="epsilon",
                   scheduler_config=dict(CIFAR_SCHEDULER)).to(device).frozen()


# ---- train -------------------------------------------------------------------------------------------
class EagerLoop:
    """The DMD step written out with plain torch: G update (DM + MSE regression), EMA, fake-score update."""

    def __init__(self, unet, schedule, batch: int, pairs: dict, device: str) -> None:
        self.dev, self.B = torch.device(device), batch
        self.real = unet
        self.G = copy.deepcopy(unet).requires_grad_(True).train()
        self.fake = copy.deepcopy(unet).requires_grad_(True).train()
        self.ema = copy.deepcopy(self.G).requires_grad_(False)
        adam = dict(lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
        self.opt_G, self.opt_fake = torch.optim.AdamW(self.G.parameters(), **adam), \
            torch.optim.AdamW(self.fake.parameters(), **adam)
        abar = schedule.alphas_cumprod.float().to(self.dev)
        self.alpha, self.sigma = abar.sqrt(), (1 - abar).sqrt()
        self.pairs, self.n = pairs, 0

    def x0(self, unet, x_t, t):
        eps = unet(x_t, t).sample.float()
        return (x_t - self.sigma[t].view(-1, 1, 1, 1) * eps) / self.alpha[t].view(-1, 1, 1, 1)

    def __call__(self) -> None:
        B, dev = self.B, self.dev
        idx = torch.randint(0, self.pairs["z"].shape[0], (B,))
        z_ref, y_ref = self.pairs["z"][idx].to(dev), self.pairs["y"][idx].to(dev)
        z = torch.randn(B, 3, 32, 32, device=dev)
        t999 = torch.full((B,), 999, device=dev)
        t, eps = torch.randint(20, 980, (B,), device=dev), torch.randn(B, 3, 32, 32, device=dev)
        self.opt_G.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = self.x0(self.G, z, t999)
            with torch.no_grad():
                x_t = self.alpha[t].view(-1, 1, 1, 1) * x + self.sigma[t].view(-1, 1, 1, 1) * eps
                mu_real, mu_fake = self.x0(self.real, x_t, t), self.x0(self.fake, x_t, t)
                w = (x - mu_real).abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-8)
                grad = torch.nan_to_num((mu_fake - mu_real) / w)
            loss_dm = 0.5 * ((x - (x - grad).detach()) ** 2).mean()
            loss_reg = ((self.x0(self.G, z_ref, t999) - y_ref) ** 2).mean()
            loss_G = loss_dm + 0.25 * loss_reg
        loss_G.backward()
        torch.nn.utils.clip_grad_norm_(self.G.parameters(), 10.0)
        self.opt_G.step()
        with torch.no_grad():
            d = min(0.999, (1 + self.n) / (10 + self.n))
            for p_ema, p in zip(self.ema.parameters(), self.G.parameters()):
                p_ema.lerp_(p, 1.0 - d)
        self.n += 1
        self.opt_fake.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (B,), device=dev)
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        x_t = a * x.detach() + s * torch.randn_like(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = self.x0(self.fake, x_t, t)
            loss = (((a / s).flatten() ** 2) * ((pred - x.detach()) ** 2).mean((1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), 10.0)
        self.opt_fake.step()


def project_trainer(teacher, batch: int, pairs: dict, compile_mode: str, device: str, seed: int = 0):
    from dmd_core.config import DistillConfig
    from dmd_core.streams import TensorStream
    from dmd_core.trainer import DMDTrainer

    cfg = DistillConfig(batch_size=batch, regression="mse", lr=1e-6, lr_fake=1e-6, bf16=True, compile=compile_mode,
                        seed=seed)
    return DMDTrainer(cfg, teacher, pairs=TensorStream(pairs, batch, seed), device=device)


def bench_train(args, out: dict) -> None:
    device, B = "cuda", args.batch
    teacher = cifar_teacher(device)
    n_pairs = 4096
    g = torch.Generator().manual_seed(1)
    pairs = {"z": torch.randn(n_pairs, 3, 32, 32, generator=g), "y": torch.randn(n_pairs, 3, 32, 32, generator=g)}
    res = out.setdefault("train", {"batch": B, "params_M": round(sum(p.numel() for p in teacher.net.parameters()) / 1e6, 1)})
    eager = EagerLoop(teacher.net, teacher.process, B, pairs, device)
    res["eager_loop"] = timed(eager, args.iters, args.warmup)
    del eager
    torch.cuda.empty_cache()
    reference = None
    for mode in args.compile_modes:
        torch.compiler.reset()
        torch.cuda.reset_peak_memory_stats()
        try:
            trainer = project_trainer(teacher, B, pairs, mode, device)
            t0 = time.perf_counter()
            first = [trainer.train_step() for _ in range(3)]  # includes compilation
            first_s = round(time.perf_counter() - t0, 1)
            losses = [{k: m[k] for k in ("loss_dm", "loss_reg", "loss_fake")} for m in first]
            row = timed(trainer.train_step, args.iters, max(args.warmup - 3, 1))
            row["first_3_steps_s"] = first_s
            row["losses_first_3"] = losses
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if reference is None:
                reference = losses
            else:
                # loss_dm starts at 0 (fake score = real score): compared absolutely, the others relatively.
                row["max_rel_diff_reg_fake_vs_first_mode"] = max(
                    abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(losses, reference) for k in ("loss_reg", "loss_fake"))
                row["max_abs_diff_dm_vs_first_mode"] = max(abs(a["loss_dm"] - b["loss_dm"])
                                                           for a, b in zip(losses, reference))
            row["ratio_vs_eager_loop"] = round(row["median_ms"] / res["eager_loop"]["median_ms"], 3)
            res[f"project_{mode}"] = row
            del trainer
        except Exception as exc:  # a failing mode is reported, the others still run
            res[f"project_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        torch.cuda.empty_cache()
        print(json.dumps(res, indent=1), flush=True)


# ---- pairs -------------------------------------------------------------------------------------------
def _prefect_stand_in() -> None:
    """Import tasks/* without Prefect installed: `task` becomes the identity (only the plain functions run)."""
    try:
        import prefect  # noqa: F401
        return
    except ImportError:
        pass
    prefect = types.ModuleType("prefect")
    prefect.task = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    policies = types.ModuleType("prefect.cache_policies")
    policies.NONE = None
    prefect.cache_policies = policies
    sys.modules["prefect"], sys.modules["prefect.cache_policies"] = prefect, policies


def bench_pairs(args, out: dict) -> None:
    _prefect_stand_in()
    from tasks.config import load_config
    from storage.layout import CONFIG, run_store
    from tasks.context import run_teacher
    from tasks.pairs import plan_pairs, record_shards, run_pairs_shard
    from tasks.teacher import run_teacher as teacher_stage

    device = args.pairs_device
    teacher = cifar_teacher("cpu")
    folder = tempfile.mkdtemp(prefix="cifar-teacher-")
    teacher.net.save_pretrained(f"{folder}/unet")
    from diffusers import DDPMScheduler
    DDPMScheduler(**{k: v for k, v in CIFAR_SCHEDULER.items() if not k.startswith("_")}).save_pretrained(
        f"{folder}/scheduler")
    root = tempfile.mkdtemp(prefix="pairs-root-")
    N, B = args.pairs_n, args.pairs_batch
    res = out.setdefault("pairs", {"n": N, "batch": B, "steps": 50, "solver": "ddim"})

    def stage(run: str, n: int, precision: str) -> float:
        cfg = load_config("cifar10-ddpm", None, [
            f"teacher.path={folder}", f"pairs.n={n}", f"pairs.shard_size={B}", f"pairs.batch_size={B}",
            f"pairs.precision={precision}", f"device={device}"])
        run_store(root, run).write_json(CONFIG, cfg.model_dump(mode="json"))
        teacher_stage(root, run)
        run_teacher(run_store(root, run), cfg, torch.device(device))  # loading is not part of the timed stage
        sync()
        t0 = time.perf_counter()
        todo, records = plan_pairs(root, run)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the flow's ThreadPoolTaskRunner(max_workers=2)
            for fut in concurrent.futures.as_completed([pool.submit(run_pairs_shard, root, run, i) for i in todo]):
                records.append(fut.result())
                record_shards(root, run, records)
        record_shards(root, run, records, complete=True)
        sync()
        return time.perf_counter() - t0

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    stage("warm", B, "auto")
    unet = run_teacher(run_store(root, "warm"), load_config("cifar10-ddpm", None, [f"teacher.path={folder}"]),
                       torch.device(device)).net
    from dmd_core.teachers import vp_process
    abar = vp_process(CIFAR_SCHEDULER).alphas_cumprod.float().to(device)
    ts = list(range(999, -1, -20))  # DDIM-50, the same grid as the stage's ddim solver

    @torch.no_grad()
    def bare() -> None:
        for _ in range(N // B):
            x = torch.randn(B, 3, 32, 32, device=device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                for i, t in enumerate(ts):
                    tt = torch.full((B,), t, device=device)
                    eps = unet(x, tt).sample.float()
                    x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
                    if i + 1 < len(ts):
                        s = ts[i + 1]
                        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
        sync()

    bare_runs = []
    for _ in range(args.pairs_repeats):
        t0 = time.perf_counter()
        bare()
        bare_runs.append(time.perf_counter() - t0)
    stage_runs = [stage(f"run{i}", N, "auto") for i in range(args.pairs_repeats)]
    res["bare_bf16_s"], res["stage_s"] = bare_runs, stage_runs
    res["bare_pairs_per_s"] = round(N / statistics.median(bare_runs), 3)
    res["stage_pairs_per_s"] = round(N / statistics.median(stage_runs), 3)
    res["ratio_stage_vs_bare"] = round(res["stage_pairs_per_s"] / res["bare_pairs_per_s"], 3)
    if args.pairs_fp32:
        res["stage_fp32_s"] = stage("fp32", N, "fp32")
        res["stage_fp32_pairs_per_s"] = round(N / res["stage_fp32_s"], 1)
    import pyarrow.parquet as pq
    meta = pq.read_schema(os.path.join(root, "run0", "pairs", "manifest.parquet")).metadata or {}
    res["manifest_metadata"] = {k.decode(): v.decode()[:200] for k, v in meta.items()}
    print(json.dumps(res, indent=1), flush=True)


# ---- infer -------------------------------------------------------------------------------------------
def sd15_pipeline(device: str):
    """SD1.5's UNet and VAE (bench/sd15_train_step.py's configs), an AutoencoderTiny and a one-step DDIM scheduler."""
    from diffusers import AutoencoderTiny, DDIMScheduler

    from bench.sd15_train_step import sd15_components

    parts = sd15_components()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    return parts["unet"].to(device), parts["vae"].to(device), AutoencoderTiny().to(device), sched


def bench_infer(args, out: dict) -> None:
    from dmd_core.inference import OneStep, fast_modules

    device = "cuda"
    unet, vae, tiny, sched = sd15_pipeline(device)
    res = out.setdefault("infer", {})
    for decoder_name, decoder in (("full_vae", vae), ("tiny_decoder", tiny)):
        if decoder_name == "tiny_decoder" and not args.infer_tiny:
            continue
        t0 = time.perf_counter()
        fast = OneStep(*fast_modules(copy.deepcopy(unet), copy.deepcopy(decoder), args.infer_mode,
                                     decoder_mode=args.decoder_mode), sched, dtype=torch.float16)
        eager = OneStep(copy.deepcopy(unet).half(), copy.deepcopy(decoder).half(), sched, dtype=torch.float16)
        for B in args.infer_batches:
            ehs = torch.randn(B, 77, 768, device=device, dtype=torch.float16)
            z = torch.randn(B, 4, 64, 64, device=device, dtype=torch.float16)
            row = {"eager_fp16": timed(lambda: eager(torch.randn_like(z), ehs), args.iters, args.warmup)}
            t1 = time.perf_counter()
            fast(z, ehs)  # first call at this batch: compilation (and CUDA-graph recording)
            torch.cuda.synchronize()
            row["fast_first_call_s"] = round(time.perf_counter() - t1, 1)
            row["fast"] = timed(lambda: fast(torch.randn_like(z), ehs), args.iters, max(args.warmup, 3))
            a, b = eager(z, ehs).float(), fast(z, ehs).float()
            row["max_abs_diff"] = float((a - b).abs().max())
            row["mean_abs_diff"] = float((a - b).abs().mean())
            row["speedup"] = round(row["eager_fp16"]["median_ms"] / row["fast"]["median_ms"], 2)
            if args.infer_split:  # the two compiled parts on their own: where the time goes
                t = torch.full((B,), fast.t, device=device, dtype=torch.long)
                x0 = torch.randn(B, 4, 64, 64, device=device, dtype=torch.float16)
                with torch.no_grad():
                    row["fast_unet_only"] = timed(lambda: fast.unet(torch.randn_like(z), t, encoder_hidden_states=ehs),
                                                  args.iters, 3)
                    row["fast_decode_only"] = timed(lambda: fast.vae.decode(torch.randn_like(x0)), args.iters, 3)
            row["fast_img_per_s"] = round(1000 * B / row["fast"]["median_ms"], 1)
            res[f"{decoder_name}_b{B}"] = row
            print(json.dumps(res, indent=1), flush=True)
            with open(args.out, "w") as f:  # after every row: a later compilation may not finish
                json.dump(out, f, indent=1)
        res[f"{decoder_name}_section_s"] = round(time.perf_counter() - t0, 1)
        del eager, fast
        torch.compiler.reset()
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="train,pairs,infer")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_perf.json"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-modes", default="none,default,reduce-overhead")
    p.add_argument("--pairs-n", type=int, default=4096)
    p.add_argument("--pairs-batch", type=int, default=1024)
    p.add_argument("--pairs-repeats", type=int, default=1)
    p.add_argument("--pairs-fp32", action="store_true")
    p.add_argument("--pairs-device", default="cuda", help="cpu: a smoke run of the pairs section")
    p.add_argument("--infer-batches", default="1,16")
    p.add_argument("--infer-mode", default="reduce-overhead")
    p.add_argument("--infer-tiny", action="store_true")
    p.add_argument("--decoder-mode", help="compile mode of the decoder (default: --infer-mode)")
    p.add_argument("--infer-split", action="store_true", help="also time the compiled UNet and decoder alone")
    args = p.parse_args()
    args.compile_modes = args.compile_modes.split(",")
    args.infer_batches = [int(b) for b in args.infer_batches.split(",")]
    if not torch.cuda.is_available():
        out = {"args": vars(args)}
        bench_pairs(args, out)
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "args": vars(args)}
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            {"train": bench_train, "pairs": bench_pairs, "infer": bench_infer}[section](args, out)
        except Exception as exc:
            import traceback
            out[f"{section}_error"] = traceback.format_exc()[-3000:]
            print(out[f"{section}_error"], flush=True)
        out[f"{section}_wall_s"] = round(time.perf_counter() - t0, 1)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
