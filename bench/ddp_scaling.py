"""Data-parallel scaling on the google/ddpm-cifar10-32 architecture (random weights): DMD training and pair
generation on 1 GPU against 2 (or more).

python bench/ddp_scaling.py [--mode train|pairs|all] [--worlds 1,2] [--steps 300] [--batch 64] [--out DIR]
python bench/ddp_scaling.py --tiny --device cpu --worlds 1,2 --steps 6    (CPU smoke run, gloo, tiny UNet)

train: for each world size W, `python -m torch.distributed.run --standalone --nproc_per_node W` runs this file's
worker, which trains `dmd_core.distributed.DDPTrainer` (W > 1) or `DMDTrainer` (W = 1): one-step generator,
MSE regression on an in-memory pair set, bf16 autocast, AdamW. Two scalings: "strong" keeps the global batch
(--batch) so the loss curves of W = 1 and W = 2 are the same training up to float noise, "weak" keeps the
per-GPU batch (global batch W * --batch). Steps after --warmup are timed (CUDA synchronised): steps/s,
images/s (global batch * steps/s), and every step's losses are recorded.
pairs: W independent processes, one per GPU (CUDA_VISIBLE_DEVICES), each generating its share of --pairs
DDIM-50 pairs at batch --pair-batch; pairs/s = all pairs / (last end - first start), each after a warm-up batch.

Needs torch, diffusers, safetensors, pydantic and the project (no Prefect). Writes $OUT/ddp_scaling.json
(or --out/ddp_scaling.json) and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)


def cifar_unet(tiny: bool):
    """google/ddpm-cifar10-32's UNet2DModel layout (35.7M parameters), or a tiny one for CPU smoke runs."""
    from diffusers import UNet2DModel

    from dmd_core.tiny import tiny_pixel_unet

    torch.manual_seed(0)
    if tiny:
        return tiny_pixel_unet(size=8)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def write_teacher(folder: str, tiny: bool) -> str:
    """A unet/ + scheduler/ teacher folder (DDPM linear betas 1e-4..2e-2, eps-prediction)."""
    from diffusers import DDPMScheduler

    cifar_unet(tiny).save_pretrained(os.path.join(folder, "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                  prediction_type="epsilon", clip_sample=False).save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- workers --------------------------------------------------------------------------------------
def train_worker(args) -> None:
    """One rank of a training run; rank 0 writes {times, losses} to args.result."""
    import torch.distributed as dist

    from dmd_core.config import DistillConfig
    from dmd_core.distributed import DDPTrainer, init_process_group
    from dmd_core.streams import TensorStream
    from dmd_core.teachers import load_teacher
    from dmd_core.trainer import DMDTrainer

    device_type = args.device
    world = int(os.environ.get("WORLD_SIZE", 1))
    env = init_process_group(device_type) if world > 1 else None
    rank = env.rank if env else 0
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    teacher = load_teacher("unet2d", args.teacher).to(device)
    g = torch.Generator().manual_seed(1)
    n_pairs = max(4 * args.global_batch, 256)
    pairs = TensorStream({"z": torch.randn((n_pairs, *teacher.sample_shape), generator=g),
                          "y": torch.randn((n_pairs, *teacher.sample_shape), generator=g).clamp(-1, 1)},
                         args.global_batch, seed=0)
    cfg = DistillConfig(batch_size=args.global_batch, regression="mse", lr=1e-5, bf16=True, world_size=world,
                        generator_timesteps=[999], seed=0, compile=os.environ.get("DMD_BENCH_COMPILE", "none"))
    cls = DDPTrainer if world > 1 else DMDTrainer
    trainer = cls(cfg, teacher, pairs=pairs, device=device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        m = trainer.train_step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append({k: m[k] for k in ("loss_G", "loss_dm", "loss_reg", "loss_fake") if k in m})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"times": times, "losses": losses, "peak_gib_rank0": peak}, f)
    if env:
        dist.destroy_process_group()


def pairs_worker(args) -> None:
    """Generate this worker's share of pairs with DDIM-50; writes {start, end, n} to args.result."""
    from dmd_core.teachers import load_teacher

    device = torch.device(args.device)
    teacher = load_teacher("unet2d", args.teacher).to(device)
    n, B = args.count, args.pair_batch
    g = torch.Generator().manual_seed(args.offset)
    z = torch.randn((B, *teacher.sample_shape), generator=g).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        teacher.sample("ddim", args.pair_steps, z[:min(B, 8)])  # warm-up
        _sync(device)
        start, done = time.time(), 0
        while done < n:
            b = min(B, n - done)
            teacher.sample("ddim", args.pair_steps, z[:b]).float().cpu()
            done += b
        _sync(device)
    with open(args.result, "w") as f:
        json.dump({"start": start, "end": time.time(), "n": done}, f)


# ---- the parent -----------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(args, teacher: str, world: int, global_batch: int, tmp: str) -> dict:
    result = os.path.join(tmp, f"train-w{world}-b{global_batch}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.abspath(__file__), "--worker", "train", "--teacher", teacher, "--result", result,
           "--global-batch", str(global_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=_env())
    out = json.load(open(result))
    times = out.pop("times")
    total = sum(times)
    steps_per_s = len(times) / total
    return {"world_size": world, "global_batch": global_batch, "per_gpu_batch": global_batch // world,
            "timed_steps": len(times), "steps_per_s": steps_per_s, "images_per_s": steps_per_s * global_batch,
            "median_step_ms": 1e3 * sorted(times)[len(times) // 2], "wall_s_with_startup": time.time() - t0, **out}


def run_pairs(args, teacher: str, world: int, tmp: str) -> dict:
    procs, results = [], []
    share = args.pairs // world
    for r in range(world):
        result = os.path.join(tmp, f"pairs-w{world}-r{r}.json")
        env = _env()
        if args.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(r)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "pairs", "--teacher", teacher, "--result",
               result, "--count", str(share), "--offset", str(r), "--pair-batch", str(args.pair_batch),
               "--pair-steps", str(args.pair_steps), "--device", args.device]
        procs.append(subprocess.Popen(cmd, env=env))
        results.append(result)
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a pairs worker failed (exit {p.returncode})")
    outs = [json.load(open(r)) for r in results]
    n = sum(o["n"] for o in outs)
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return {"workers": world, "pairs": n, "steps": args.pair_steps, "batch": args.pair_batch,
            "pairs_per_s": n / wall, "seconds": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["train", "pairs", "all"], default="all")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="global batch of the strong-scaling runs, "
                                                         "per-GPU batch of the weak-scaling runs")
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--pair-batch", type=int, default=512)
    p.add_argument("--pair-steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (CPU smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    # worker-only arguments
    p.add_argument("--worker", choices=["train", "pairs"])
    p.add_argument("--teacher")
    p.add_argument("--result")
    p.add_argument("--global-batch", type=int)
    p.add_argument("--count", type=int)
    p.add_argument("--offset", type=int, default=0)
    args = p.parse_args()
    if args.worker == "train":
        return train_worker(args)
    if args.worker == "pairs":
        return pairs_worker(args)

    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {args.worlds} needs {max(worlds)} GPUs, {torch.cuda.device_count()} visible")
    tmp = tempfile.mkdtemp(prefix="ddp-scaling-")
    teacher = write_teacher(os.path.join(tmp, "teacher"), args.tiny)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "architecture": "tiny" if args.tiny else "google/ddpm-cifar10-32 UNet2DModel (random weights)",
              "args": {k: v for k, v in vars(args).items() if v is not None and k not in ("worker", "result")}}
    if args.mode in ("train", "all"):
        runs = []
        for w in worlds:
            runs.append({"scaling": "strong", **run_train(args, teacher, w, args.batch, tmp)})
            if w > 1:
                runs.append({"scaling": "weak", **run_train(args, teacher, w, args.batch * w, tmp)})
        base = runs[0]
        for r in runs:
            r["speedup_images_per_s"] = r["images_per_s"] / base["images_per_s"]
        strong = [r for r in runs if r["scaling"] == "strong"]
        if len(strong) > 1:  # same global batch, same draws: the loss curves should coincide
            a, b = strong[0]["losses"], strong[1]["losses"]
            report["strong_loss_max_rel_gap"] = max(abs(x["loss_G"] - y["loss_G"]) / max(abs(x["loss_G"]), 1e-12)
                                                    for x, y in zip(a, b))
        report["train"] = runs
    if args.mode in ("pairs", "all"):
        report["pairs"] = [run_pairs(args, teacher, w, tmp) for w in worlds]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ddp_scaling.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    summary = {k: v for k, v in report.items() if k != "train"}
    summary["train"] = [{k: v for k, v in r.items() if k != "losses"} for r in report.get("train", [])]
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
