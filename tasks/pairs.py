"""Stage `pairs`: noise-image pairs from the teacher's deterministic ODE solver, one shard per task (DMD §3.3)."""
from __future__ import annotations

import functools
import math

import torch
from prefect import task
from prefect.cache_policies import NONE
from tqdm import tqdm

from dmd_core.denoisers import with_guidance
from dmd_core.samplers import sample
from dmd_core.schedules import timestep_grid
from storage import ChecksumError, ShardRecord, read_manifest, verify_shard, write_manifest, write_shard
from storage.layout import PAIRS_MANIFEST, shard_key
from tasks.context import (device_for, is_done, load_teacher, mark_done, null_class, open_run, sample_noise,
                           unmark_done)


def pairs_key(cfg) -> str:
    return cfg.section_hash("data", "teacher", "pairs")


def plan_pairs(root: str, run_name: str, force: bool = False) -> tuple[list[int], list[ShardRecord]]:
    """(shard ids still to produce, records of complete shards kept: in the manifest with a valid sha256)."""
    store, cfg = open_run(root, run_name)
    n_shards = math.ceil(cfg.pairs.n / cfg.pairs.shard_size)
    if force:
        unmark_done(store, "pairs")
        return list(range(n_shards)), []
    if is_done(store, "pairs", pairs_key(cfg)):
        records = read_manifest(store, PAIRS_MANIFEST)
        if sum(r.n_samples for r in records) == cfg.pairs.n:
            return [], records
        unmark_done(store, "pairs")
    kept = []
    for rec in read_manifest(store, PAIRS_MANIFEST):
        if rec.producer_hash != pairs_key(cfg):
            continue
        try:
            verify_shard(store, rec)
        except (ChecksumError, FileNotFoundError):
            continue
        kept.append(rec)
    done = {int(r.shard.rsplit("-", 1)[1].split(".")[0]) for r in kept}
    return [i for i in range(n_shards) if i not in done], kept


@functools.lru_cache(maxsize=2)
def _teacher(root: str, run_name: str, key: str):
    store, cfg = open_run(root, run_name)
    device = device_for(cfg)
    D, _, _ = load_teacher(store, cfg, device)
    return with_guidance(D, cfg.pairs.guidance, null_class(cfg)), D.schedule, device


def run_pairs_shard(root: str, run_name: str, shard_id: int) -> ShardRecord:
    """Sample shard `shard_id`: z_i is a pure function of (seed, i); class i % num_classes."""
    store, cfg = open_run(root, run_name)
    key = pairs_key(cfg)
    D, schedule, device = _teacher(root, run_name, key)
    p, data = cfg.pairs, cfg.data
    indices = list(range(shard_id * p.shard_size, min(p.n, (shard_id + 1) * p.shard_size)))
    if not indices:
        raise ValueError(f"shard {shard_id} is empty for pairs.n={p.n}, pairs.shard_size={p.shard_size}")
    shape = (data.channels, data.image_size, data.image_size)
    samples = []
    for chunk in tqdm([indices[i:i + p.batch_size] for i in range(0, len(indices), p.batch_size)],
                      desc=f"pairs shard {shard_id}", leave=False):
        z = torch.stack([sample_noise(p.seed, i, shape) for i in chunk])
        cond = torch.tensor([i % data.num_classes for i in chunk], device=device) if data.num_classes else None
        y = sample(p.solver, D, z.to(device), timestep_grid(schedule.T, p.steps), schedule, cond).float().cpu()
        for j, i in enumerate(chunk):
            meta = {"index": i, "class": int(cond[j]) if cond is not None else None}
            samples.append({"__key__": f"{i:08d}", "noise.npy": z[j].numpy(), "image.npy": y[j].numpy(), "json": meta})
    return write_shard(store, shard_key(shard_id), samples, producer_hash=key)


def record_shards(root: str, run_name: str, records: list[ShardRecord], complete: bool = False) -> None:
    """Rewrite the manifest (atomically) with every shard finished so far; mark the stage done at the end."""
    store, cfg = open_run(root, run_name)
    records = sorted(records, key=lambda r: r.first_index)
    if complete and is_done(store, "pairs", pairs_key(cfg)) and read_manifest(store, PAIRS_MANIFEST) == records:
        return  # already complete: rewrite nothing
    write_manifest(store, PAIRS_MANIFEST, records)
    if complete:
        total = sum(r.n_samples for r in records)
        if total != cfg.pairs.n:
            raise RuntimeError(f"pairs manifest holds {total} samples, expected pairs.n={cfg.pairs.n}")
        mark_done(store, "pairs", pairs_key(cfg), n=total, shards=len(records))


@task(name="pairs-shard", retries=2, cache_policy=NONE, persist_result=False)
def pairs_shard_task(root: str, run_name: str, shard_id: int) -> ShardRecord:
    """Prefect wrapper of run_pairs_shard (one shard per task, mapped over shard ids)."""
    return run_pairs_shard(root, run_name, shard_id)
