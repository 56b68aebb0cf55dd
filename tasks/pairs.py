"""Stage `pairs`: noise-output pairs from the teacher's deterministic ODE solver, one shard per task (DMD §3.3).

Shards hold `noise.npy` (z, float32), `image.npy` (the teacher's output in model space: pixels, or latents
for latent teachers) in `pairs.dtype`, and a json with the index and its class id or prompt.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from dmd_core import accel
from dmd_core.conditions import batch_conditions
from dmd_core.denoisers import cond_map
from storage import ShardRecord, read_manifest, shard_damage, write_manifest, write_shard
from storage.layout import PAIRS_MANIFEST, shard_key
from tasks.context import conditions, device_for, open_run, run_teacher, sample_noise
from tasks.gpu_slots import gpu_slots
from tasks.stages import PAIRS_STAGE


def plan_pairs(root: str, run_name: str, force: bool = False) -> tuple[list[int], list[ShardRecord]]:
    """(shard ids still to produce, records of complete shards kept: in the manifest with a valid sha256)."""
    store, cfg = open_run(root, run_name)
    n_shards = math.ceil(cfg.pairs.n / cfg.pairs.shard_size)
    if force:
        PAIRS_STAGE.unmark(store)
        return list(range(n_shards)), []
    if PAIRS_STAGE.is_done(store, cfg):
        records = read_manifest(store, PAIRS_MANIFEST)
        if sum(r.n_samples for r in records) == cfg.pairs.n and all(shard_damage(store, r) is None for r in records):
            return [], records
        PAIRS_STAGE.unmark(store)
    kept = []
    for rec in read_manifest(store, PAIRS_MANIFEST):
        if rec.producer_hash != PAIRS_STAGE.key(cfg):
            continue
        damage = shard_damage(store, rec)
        if damage is not None:
            print(f"pairs: {store.url(rec.shard)} is damaged or missing ({damage}); regenerating it")
            continue
        kept.append(rec)
    done = {int(r.shard.rsplit("-", 1)[1].split(".")[0]) for r in kept}
    return [i for i in range(n_shards) if i not in done], kept


def solver_precision(cfg, device: torch.device) -> str:
    """`pairs.precision` with auto resolved: bf16 autocast on CUDA, fp32 on the CPU."""
    return accel.resolve_precision(cfg.pairs.precision, device)


def run_pairs_shard(root: str, run_name: str, shard_id: int) -> ShardRecord:
    """Sample shard `shard_id`: z_i and the condition of sample i are pure functions of (seed, i)."""
    store, cfg = open_run(root, run_name)
    device = device_for(cfg)
    teacher = run_teacher(store, cfg, device)
    source = conditions(teacher, cfg)
    p = cfg.pairs
    indices = list(range(shard_id * p.shard_size, min(p.n, (shard_id + 1) * p.shard_size)))
    if not indices:
        raise ValueError(f"shard {shard_id} is empty for pairs.n={p.n}, pairs.shard_size={p.shard_size}")
    dtype = np.dtype(p.dtype)
    precision = solver_precision(cfg, device)
    samples = []
    for chunk in [indices[i:i + p.batch_size] for i in range(0, len(indices), p.batch_size)]:
        z = torch.stack([sample_noise(p.seed, i, teacher.sample_shape) for i in chunk])
        raw = batch_conditions(source, p.seed, chunk)
        cond = teacher.encode(raw)  # the text encoder runs outside autocast, as in training
        scales = [p.scale_of(i) for i in chunk]
        with accel.autocast(precision, device):
            if p.guidance_scales is None:
                y = teacher.sample(p.solver, p.steps, z.to(device, non_blocking=True), cond, p.guidance)
            else:  # one solve per scale present in the chunk
                y = torch.empty_like(z, device=device)
                for w in sorted(set(scales)):
                    rows = torch.tensor([j for j, s in enumerate(scales) if s == w], device=device)
                    sub = cond_map(lambda c: c[rows.to(c.device)], cond)
                    y[rows] = teacher.sample(p.solver, p.steps, z[rows.cpu()].to(device), sub, w).to(y.dtype)
        y = y.float().cpu()
        for j, i in enumerate(chunk):
            meta = {"index": i, "class": int(raw[j]) if isinstance(raw, torch.Tensor) else None}
            if isinstance(raw, list):
                meta["prompt"] = raw[j]
            if p.guidance_scales is not None:
                meta["guidance"] = scales[j]
            # z stays float32: it is the exact input that produced y; only y is stored in pairs.dtype.
            samples.append({"__key__": f"{i:08d}", "noise.npy": z[j].numpy(),
                            "image.npy": y[j].numpy().astype(dtype), "json": meta})
    return write_shard(store, shard_key(shard_id), samples, producer_hash=PAIRS_STAGE.key(cfg))


def record_shards(root: str, run_name: str, records: list[ShardRecord], complete: bool = False) -> None:
    """Rewrite the manifest (atomically) with every shard finished so far; mark the stage done at the end."""
    store, cfg = open_run(root, run_name)
    records = sorted(records, key=lambda r: r.first_index)
    if complete and PAIRS_STAGE.is_done(store, cfg) and read_manifest(store, PAIRS_MANIFEST) == records:
        return  # already complete: rewrite nothing
    p = cfg.pairs
    metadata = {"solver": p.solver, "steps": p.steps, "guidance": p.guidance, "dtype": p.dtype, "seed": p.seed,
                "teacher_kind": cfg.teacher.kind, "precision": solver_precision(cfg, device_for(cfg))}
    if p.guidance_scales is not None:
        metadata["guidance_scales"] = p.guidance_scales
    write_manifest(store, PAIRS_MANIFEST, records, metadata=metadata)
    if complete:
        total = sum(r.n_samples for r in records)
        if total != p.n:
            raise RuntimeError(f"pairs manifest holds {total} samples, expected pairs.n={p.n}")
        PAIRS_STAGE.mark(store, cfg, n=total, shards=len(records))


@task(name="pairs-shard", retries=2, cache_policy=NONE, persist_result=False)
def pairs_shard_task(root: str, run_name: str, shard_id: int) -> ShardRecord:
    """Prefect wrapper of run_pairs_shard (one shard per task, mapped over shard ids; in worker k of a local Dask
    cluster it runs on GPU k mod n, `tasks.context.worker_gpu`)."""
    with gpu_slots(open_run(root, run_name)[1]):
        return run_pairs_shard(root, run_name, shard_id)
