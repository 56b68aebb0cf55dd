"""When compiling the trainer pays, and what the run's compile cache saves on resume (CUDA only).

python bench/compile_cache.py [--out OUT.json] [--batch 64] [--steps 20]

On the google/ddpm-cifar10-32 architecture (random weights, batch 64, bf16, DM + MSE regression, the trainer of
`bench/gpu_perf.py`), three fresh processes, each with its own empty inductor and Triton cache folders:
- eager: `distill.compile=none`: time to the first step done, then the median step;
- cold: `distill.compile=default`: time to the first step (compilation included), the median compiled step, and
  torch's compile cache artifacts as `dmd_core.accel.compile_cache_bytes` returns them (what a distill run saves);
- resumed: the same, after `dmd_core.accel.load_compile_cache` of the cold process's artifacts (what a resumed
  distill run loads before its first step).
Compile time = time to the first step minus the eager process's. Writes JSON after each process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(mode: str, blob_path: str, batch: int, steps: int) -> dict:
    """One process's measurement (mode: eager, cold or resumed)."""
    sys.path.insert(0, REPO)
    import torch

    from bench.gpu_perf import cifar_teacher, project_trainer
    from dmd_core import accel

    t0 = time.perf_counter()
    if mode == "resumed":
        with open(blob_path, "rb") as f:
            accel.load_compile_cache(f.read())
    teacher = cifar_teacher("cuda")
    g = torch.Generator().manual_seed(1)
    pairs = {"z": torch.randn(4096, 3, 32, 32, generator=g), "y": torch.randn(4096, 3, 32, 32, generator=g)}
    trainer = project_trainer(teacher, batch, pairs, "none" if mode == "eager" else "default", "cuda")
    first = trainer.train_step()
    torch.cuda.synchronize()
    out = {"first_step_s": round(time.perf_counter() - t0, 2), "loss_reg_first": first["loss_reg"]}
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out["median_step_ms"] = round(1e3 * statistics.median(times[2:]), 2)
    if mode != "eager":  # where the compile time went: torch's cache counters and per-phase compile times
        from torch._dynamo.utils import compile_times, counters

        out["counters"] = {group: dict(c) for group, c in counters.items()
                           if group in ("inductor", "aot_autograd", "frames", "stats", "recompiles")}
        out["compile_times"] = compile_times(repr="str", aggregate=True)[-4000:]
    if mode == "cold":
        blob = accel.compile_cache_bytes()
        with open(blob_path, "wb") as f:
            f.write(blob)
        out["cache_mib"] = round(len(blob) / 2**20, 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "compile_cache.json"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--child", choices=["eager", "cold", "resumed"])
    p.add_argument("--blob")
    p.add_argument("--precompile", action="store_true", help="TORCH_CACHING_PRECOMPILE=1: dynamo's own output "
                                                                "goes into the cache artifacts too (experimental)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.blob, args.batch, args.steps)))
        return
    import torch

    res = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "batch": args.batch, "architecture": "google/ddpm-cifar10-32 (random)",
           "precompile": args.precompile}
    work = tempfile.mkdtemp(prefix="compile-cache-")
    blob = os.path.join(work, "cache.bin")
    for mode in ("eager", "cold", "resumed"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, mode, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(work, mode, "triton"),
               "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        if args.precompile:
            env["TORCH_CACHING_PRECOMPILE"] = "1"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--blob", blob, "--batch", str(args.batch),
                               "--steps", str(args.steps)], env=env, capture_output=True, text=True)
        row = {"process_s": round(time.perf_counter() - t0, 1)}
        try:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            row["error"] = proc.stderr[-3000:]
        res[mode] = row
        if mode != "eager" and "first_step_s" in row and "first_step_s" in res["eager"]:
            row["compile_s"] = round(row["first_step_s"] - res["eager"]["first_step_s"], 1)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({mode: row}), flush=True)
    cold, resumed = res["cold"].get("compile_s"), res["resumed"].get("compile_s")
    if cold and resumed is not None:
        res["resumed_over_cold_compile"] = round(resumed / cold, 3)
        res["resumed_over_cold_first_step"] = round(res["resumed"]["first_step_s"] / res["cold"]["first_step_s"], 3)
    if "median_step_ms" in res["cold"]:
        res["compiled_step_saving"] = round(1 - res["cold"]["median_step_ms"] / res["eager"]["median_step_ms"], 3)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
