"""Shared glue for stage tasks: open a run, pick the device, load the teacher and the pairs."""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import torch

from dmd_core.config import PipelineConfig
from dmd_core.denoisers import UNetDenoiser
from dmd_core.schedules import VPSchedule
from storage import ArtifactStore, iter_shards, read_manifest, verify_manifest
from storage.layout import CONFIG, PAIRS_MANIFEST, TEACHER, done_marker, run_store
from storage.models import local_folder


def open_run(root: str, run_name: str) -> tuple[ArtifactStore, PipelineConfig]:
    """The run's store and the resolved config the flow saved there."""
    store = run_store(root, run_name)
    if not store.exists(CONFIG):
        raise FileNotFoundError(f"{store.url(CONFIG)} not found: run the flow (it saves the resolved config) first")
    return store, PipelineConfig.model_validate(store.read_json(CONFIG))


def device_for(cfg: PipelineConfig) -> torch.device:
    """cuda when asked for (or auto and available), else cpu; applies `threads`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is available; set device=cpu or auto")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def is_done(store: ArtifactStore, stage: str, key: str) -> bool:
    """True when `stage` completed with the same config hash."""
    marker = done_marker(stage)
    return store.exists(marker) and store.read_json(marker).get("hash") == key


def unmark_done(store: ArtifactStore, stage: str) -> None:
    """Forget that `stage` completed (before a forced recompute, so an interrupted one is never trusted)."""
    store.delete(done_marker(stage), missing_ok=True)


def mark_done(store: ArtifactStore, stage: str, key: str, **extra) -> None:
    store.write_json(done_marker(stage), {"hash": key, **extra})


def load_teacher(store: ArtifactStore, cfg: PipelineConfig, device: torch.device):
    """(denoiser D, unet, diffusers scheduler) from the run's teacher folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    # low_cpu_mem_usage=False: accelerate's empty-weights init patches nn.Module globally and is not
    # thread-safe; shard tasks load the teacher from several threads at once.
    with local_folder(store, TEACHER) as path:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet = unet.to(device).eval().requires_grad_(False)
    return UNetDenoiser(unet, VPSchedule.from_scheduler(scheduler), cfg.teacher.prediction_type), unet, scheduler


def load_pairs(store: ArtifactStore, verify: bool = True) -> dict[str, torch.Tensor]:
    """All pairs of the run as tensors {z, y, cond} ordered by sample index (manifest checked first)."""
    records = read_manifest(store, PAIRS_MANIFEST)
    if not records:
        raise FileNotFoundError(f"{store.url(PAIRS_MANIFEST)} is missing or empty: run the pairs stage first")
    if verify:
        verify_manifest(store, records)
    samples = sorted(iter_shards([store.url(r.shard) for r in records], store.storage_options, nodesplitter=None),
                     key=lambda s: s["index"])
    out = {"z": torch.from_numpy(np.stack([s["noise.npy"] for s in samples])).float(),
           "y": torch.from_numpy(np.stack([s["image.npy"] for s in samples])).float()}
    if "json" in samples[0] and samples[0]["json"].get("class") is not None:
        out["cond"] = torch.tensor([s["json"]["class"] for s in samples], dtype=torch.long)
    return out


def sample_noise(seed: int, index: int, shape: tuple) -> torch.Tensor:
    """Noise for sample `index`: a pure function of (seed, index), so any shard regenerates identically."""
    g = torch.Generator().manual_seed(hash_seed(seed, index))
    return torch.randn(shape, generator=g)


def hash_seed(seed: int, index: int) -> int:
    """A 63-bit seed derived from (seed, index) with SHA-256 (independent of Python's hash salt)."""


    return int.from_bytes(hashlib.sha256(json.dumps([seed, index]).encode()).digest()[:8], "little") >> 1


def null_class(cfg: PipelineConfig) -> Optional[int]:
    """The unconditional class id (num_classes) for class-conditional teachers."""
    return cfg.data.num_classes if cfg.data.num_classes else None
