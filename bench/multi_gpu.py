"""The project's stages on several GPUs of one host (google/ddpm-cifar10-32 architecture, random weights).

python bench/multi_gpu.py [--parts pairs,resume] [--gpus 2] [--pairs 8192] [--steps 120] [--out DIR]
python bench/multi_gpu.py --device cpu --gpus 2 --pairs 64 --pair-batch 16 --steps 6 --tiny   (CPU smoke run)

pairs:  the pairs stage's shard task (`tasks.pairs.run_pairs_shard`) in one worker process per GPU
        (CUDA_VISIBLE_DEVICES=i, as `CUDA_VISIBLE_DEVICES=i dask worker --resources GPU=1` runs it), the shards
        dealt round-robin, then the manifest written by `tasks.pairs.record_shards`; 1 GPU against --gpus GPUs,
        each worker timed after loading its teacher and one warm-up batch. The manifests of the two runs are
        compared shard by shard (index range, count, sha256).
resume: the distill stage with `distill.world_size = --gpus` (torchrun, `tasks.ddp`) run once uninterrupted,
        and once with rank 1 SIGKILLed after the checkpoint at 2/3 of the steps, then run again, which resumes
        from that checkpoint; the final weights of both runs are compared.

Without Prefect installed (a bare CUDA image) the tasks' `@task` decorator is replaced by the identity, in this
process and in the ranks (a stand-in package on PYTHONPATH); only plain functions run. Writes
$OUT/multi_gpu.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

_STAND_IN = {
    "__init__.py": "def task(*a, **k):\n    return a[0] if a and callable(a[0]) else (lambda f: f)\n",
    "cache_policies.py": "NONE = None\n",
}


def prefect_stand_in(folder: str) -> None:
    """Without Prefect: a package whose `task` is the identity, first on this process's and its children's path."""
    try:
        import prefect  # noqa: F401
        return
    except ImportError:
        pass
    pkg = os.path.join(folder, "prefect")
    os.makedirs(pkg, exist_ok=True)
    for name, text in _STAND_IN.items():
        with open(os.path.join(pkg, name), "w") as f:
            f.write(text)
    sys.path.insert(0, folder)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, PROJECT, os.environ.get("PYTHONPATH")) if p)


def write_run(root: str, run: str, args, overrides: list[str]) -> None:
    """A run folder holding the cifar10-ddpm preset with the bench's teacher and sizes, and its teacher stage."""
    from tasks.config import load_config
    from storage.layout import CONFIG, run_store
    from tasks.teacher import run_teacher as teacher_stage

    cfg = load_config("cifar10-ddpm", None, [
        f"teacher.path={args.teacher}", f"pairs.n={args.pairs}", f"pairs.shard_size={args.pair_batch}",
        f"pairs.batch_size={args.pair_batch}", f"device={args.device}", "distill.regression=mse",
        f"distill.steps={args.steps}", f"distill.checkpoint_every={max(1, args.steps // 3)}",
        f"distill.sample_every={10 * args.steps}", "distill.lr=1e-5", "distill.lr_fake=1e-5",
        "distill.compile=none", *overrides])  # compiling (~5 min) is not what the resume part measures
    run_store(root, run).write_json(CONFIG, cfg.model_dump(mode="json"))
    teacher_stage(root, run)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- pairs --------------------------------------------------------------------------------------------
def pairs_worker(args) -> None:
    """Shard tasks of one GPU: load the teacher and warm up, then time the shards; records to args.result."""
    from storage.layout import run_store
    from tasks.context import device_for, open_run, run_teacher
    from tasks.pairs import run_pairs_shard

    store, cfg = open_run(args.root, args.run)
    device = device_for(cfg)
    teacher = run_teacher(run_store(args.root, args.run), cfg, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        teacher.sample(cfg.pairs.solver, cfg.pairs.steps, torch.randn(cfg.pairs.batch_size, *teacher.sample_shape,
                                                                      device=device))
    _sync(device.type)
    start = time.time()
    records = [asdict(run_pairs_shard(args.root, args.run, int(i))) for i in args.shards.split(",") if i]
    _sync(device.type)
    with open(args.result, "w") as f:
        json.dump({"start": start, "end": time.time(), "records": records}, f)


def run_pairs(args, root: str, workers: int) -> dict:
    from storage.layout import PAIRS_MANIFEST, run_store
    from storage.manifest import ShardRecord, read_manifest
    from tasks.pairs import plan_pairs, record_shards

    run = f"pairs-{workers}gpu"
    write_run(root, run, args, [])
    todo, records = plan_pairs(root, run)
    procs = []
    for r in range(workers):
        result = os.path.join(root, f"{run}-worker{r}.json")
        env = dict(os.environ, OMP_NUM_THREADS="4")
        if args.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(r)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "pairs", "--root", root, "--run", run,
               "--shards", ",".join(str(i) for i in todo[r::workers]), "--result", result]
        procs.append((subprocess.Popen(cmd, env=env), result))
    outs = []
    for proc, result in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"a pairs worker failed (exit {proc.returncode})")
        outs.append(json.load(open(result)))
    records += [ShardRecord(**rec) for o in outs for rec in o["records"]]
    record_shards(root, run, records, complete=True)
    manifest = read_manifest(run_store(root, run), PAIRS_MANIFEST)
    n = sum(rec.n_samples for rec in manifest)
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    per_worker = [sum(rec["n_samples"] for rec in o["records"]) / (o["end"] - o["start"]) for o in outs]
    return {"gpus": workers, "pairs": n, "seconds": wall, "pairs_per_s": n / wall, "per_worker_pairs_per_s":
            per_worker, "manifest": [(m.shard, m.first_index, m.n_samples, m.sha256) for m in manifest]}


# ---- kill a rank, resume ----------------------------------------------------------------------------
def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun child (any depth below `parent`) whose environment has RANK=rank."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode() and b"TORCHELASTIC_RUN_ID" in env:
            p = ppid
            while p > 1:
                if p == parent:
                    return int(pid)
                try:
                    with open(f"/proc/{p}/stat") as f:
                        p = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    break
    return None


def _final_weights(root: str, run: str) -> dict:
    """Every tensor of the run's last checkpoint except the RNG states (process-wide, see docs/reliability.md)."""
    from safetensors.torch import load

    from storage.checkpoints import list_checkpoints, read_checkpoint
    from tasks.context import open_run
    from tasks.stages import resume_key

    store, cfg = open_run(root, run)
    key = resume_key(store, cfg)
    step = list_checkpoints(store, key)[-1]
    files = read_checkpoint(store, step, key)
    return {"step": step, "tensors": {f"{name}:{k}": v for name, data in files.items()
                                      if name.endswith(".safetensors") and not name.startswith("rng")
                                      for k, v in load(data).items()}}


def run_resume(args, root: str, source: str) -> dict:
    import shutil

    from tasks.config import load_config  # noqa: F401
    from storage.checkpoints import list_checkpoints
    from storage.layout import run_store
    from tasks.context import open_run
    from tasks.launch import launch_distill, torchrun_command
    from tasks.stages import resume_key

    out = {}
    for run in ("ddp-uninterrupted", "ddp-killed"):
        write_run(root, run, args, [f"distill.world_size={args.gpus}"])
        shutil.copytree(os.path.join(root, source, "pairs"), os.path.join(root, run, "pairs"))
    store, cfg = open_run(root, "ddp-uninterrupted")
    t0 = time.time()
    launch_distill(root, "ddp-uninterrupted", False, cfg.distill, log=lambda line: None)
    out["uninterrupted_s"] = time.time() - t0
    print(f"resume: uninterrupted run done in {out['uninterrupted_s']:.0f} s", flush=True)

    store, cfg = open_run(root, "ddp-killed")
    key, kill_after = resume_key(store, cfg), 2 * cfg.distill.checkpoint_every
    env = dict(os.environ)  # what launch_distill gives its ranks: the same thread count in all three runs
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(torchrun_command(root, "ddp-killed", False, cfg.distill), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, killed = time.time(), None
    while proc.poll() is None and time.time() - t0 < 600:
        steps = list_checkpoints(run_store(root, "ddp-killed"), key)
        if steps and steps[-1] >= kill_after and killed is None:
            pid = _rank_pid(proc.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = {"pid": pid, "after_checkpoint": steps[-1], "at_s": time.time() - t0}
        time.sleep(0.05)
    rc = proc.wait()
    out["killed"] = {**(killed or {}), "torchrun_exit": rc,
                     "checkpoints_at_exit": list_checkpoints(run_store(root, "ddp-killed"), key),
                     "stderr_tail": (proc.stderr.read() or "")[-1500:]}
    print(f"resume: rank 1 killed, torchrun exit {rc}", flush=True)
    t0 = time.time()
    launch_distill(root, "ddp-killed", False, cfg.distill, log=lambda line: None)
    out["resumed_s"] = time.time() - t0
    a, b = _final_weights(root, "ddp-uninterrupted"), _final_weights(root, "ddp-killed")
    diffs = {k: float((a["tensors"][k].float() - b["tensors"][k].float()).abs().max()) for k in a["tensors"]}
    out.update({"final_step": [a["step"], b["step"]], "tensors": len(diffs),
                "bit_identical": all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]),
                "max_abs_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get)})
    import pyarrow.parquet as pq
    from storage.layout import METRICS
    m = [pq.read_table(os.path.join(root, r, *METRICS.split("/"))).to_pydict() for r in ("ddp-uninterrupted",
                                                                                       "ddp-killed")]
    out["loss_G_last"] = [m[0]["loss_G"][-1], m[1]["loss_G"][-1]]
    out["loss_G_max_rel_gap"] = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(m[0]["loss_G"], m[1]["loss_G"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="pairs,resume")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--pairs", type=int, default=8192)
    p.add_argument("--pair-batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (CPU smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--worker", choices=["pairs"])
    p.add_argument("--root")
    p.add_argument("--run")
    p.add_argument("--shards", default="")
    p.add_argument("--result")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="multi-gpu-")
    prefect_stand_in(os.path.join(tmp, "stand-in"))
    if args.worker == "pairs":
        return pairs_worker(args)
    if args.device == "cuda" and args.gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: {torch.cuda.device_count()} visible")
    from bench.ddp_scaling import write_teacher

    args.teacher = write_teacher(os.path.join(tmp, "teacher"), args.tiny)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "gpus": args.gpus,
              "args": {k: v for k, v in vars(args).items() if v not in (None, "")}}
    path = os.path.join(args.out, "multi_gpu.json")
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report, indent=1)[-4000:], flush=True)

    for part in args.parts.split(","):
        t0 = time.time()
        try:
            if part == "pairs":
                one, many = run_pairs(args, tmp, 1), run_pairs(args, tmp, args.gpus)
                report["pairs"] = {"one": {k: v for k, v in one.items() if k != "manifest"},
                                   "many": {k: v for k, v in many.items() if k != "manifest"},
                                   "speedup": many["pairs_per_s"] / one["pairs_per_s"],
                                   "manifests_identical": one["manifest"] == many["manifest"],
                                   "shards": len(one["manifest"])}
            elif part == "resume":
                source = "pairs-1gpu" if os.path.isdir(os.path.join(tmp, "pairs-1gpu", "pairs")) else None
                if source is None:
                    write_run(tmp, "pairs-src", args, [])
                    from tasks.pairs import plan_pairs, record_shards, run_pairs_shard
                    todo, recs = plan_pairs(tmp, "pairs-src")
                    record_shards(tmp, "pairs-src", recs + [run_pairs_shard(tmp, "pairs-src", i) for i in todo],
                                  complete=True)
                    source = "pairs-src"
                report["resume"] = run_resume(args, tmp, source)
        except Exception:
            import traceback
            report[f"{part}_error"] = traceback.format_exc()[-3000:]
        report[f"{part}_wall_s"] = round(time.time() - t0, 1)
        save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
