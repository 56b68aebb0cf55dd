"""Shared glue for stage tasks: open a run, pick the device, load the run's teacher, prompts and pair stream."""
from __future__ import annotations

import functools
import threading
from typing import Optional

import numpy as np
import torch

from dmd_core.accel import channels_last
from dmd_core.conditions import Conditions, hash_seed
from dmd_core.config import resolve_path
from tasks.config import PipelineConfig
from dmd_core.streams import Stream, TensorStream
from dmd_core.teachers import Teacher, load_teacher
from storage import ArtifactStore, ShardStream, read_manifest
from storage.captions import read_captions
from storage.layout import CONFIG, PAIRS_MANIFEST, REAL_MANIFEST, TEACHER, run_store
from storage.models import cached_folder
from storage.stream import read_shard
from tasks.stages import TEACHER_STAGE

_TEACHER_LOCK = threading.Lock()
_TEACHERS: dict[tuple, Teacher] = {}


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
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpu = worker_gpu(torch.cuda.device_count())
    if gpu is not None:
        torch.cuda.set_device(gpu)
    return torch.device("cuda")


def worker_gpu(n_gpus: int) -> Optional[int]:
    """The GPU of this process when it is worker k of a local Dask cluster on a host with several GPUs: k mod n.

    A local cluster (`pairs.runner=dask` without an address) starts its workers with every GPU visible; without
    this each would use GPU 0. Workers started one per GPU (`CUDA_VISIBLE_DEVICES=i dask worker`) see one GPU,
    and Ray sets CUDA_VISIBLE_DEVICES for each task itself: None, the current device stays.
    """
    if n_gpus < 2:
        return None
    try:
        from distributed import get_worker
        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return None
    return name % n_gpus if isinstance(name, int) else None


def run_teacher(store: ArtifactStore, cfg: PipelineConfig, device: torch.device, own: bool = False) -> Teacher:
    """The run's teacher, loaded once per process and content (read-only: copy its network to train it); `own`: a
    fresh load the caller may change, not kept."""
    if not store.exists(TEACHER_STAGE.marker):
        raise FileNotFoundError(f"{store.url(TEACHER_STAGE.marker)} not found: run the teacher stage first")
    marker = store.read_json(TEACHER_STAGE.marker)
    t = cfg.teacher
    key = (store.url(TEACHER), marker.get("content", marker["hash"]), t.model_dump_json(), str(device))
    with _TEACHER_LOCK:
        if key not in _TEACHERS or own:
            path = cached_folder(store, TEACHER, key[1]) if t.kind != "callable" else t.path
            teacher = load_teacher(t.kind, path, prediction_type=t.prediction_type, decoder_path=t.decoder_path,
                                   factory=t.factory).to(device)
            if device.type == "cuda":  # NHWC convolutions: cuDNN's fast layout for bf16/fp16 (values unchanged)
                channels_last(teacher.denoiser)
            if own:
                return teacher
            while len(_TEACHERS) >= 2:  # keep memory bounded: at most two loaded teachers per process
                _TEACHERS.pop(next(iter(_TEACHERS)))
            _TEACHERS[key] = teacher
        return _TEACHERS[key]


def prompts(cfg: PipelineConfig) -> Optional[list[str]]:
    """The caption source's prompts (text-to-image teachers), else None; read once per process."""
    if not cfg.data.captions:
        return None
    return list(_read_captions(resolve_path(cfg.data.captions), cfg.data.caption_column))


@functools.lru_cache(maxsize=4)
def _read_captions(url: str, column: Optional[str]) -> tuple[str, ...]:
    return tuple(read_captions(url, column))


def conditions(teacher: Teacher, cfg: PipelineConfig) -> Optional[Conditions]:
    """The run's condition source: class ids, the caption file's prompts, or None."""
    return teacher.conditions(prompts(cfg) if teacher.conditioning == "text" else None)


def pair_stream(store: ArtifactStore, cfg: PipelineConfig, batch_size: int, seed: int) -> Stream:
    """An exactly resumable stream over the run's pairs: held in memory when the shards total at most
    `distill.pairs_in_memory_mb` (read once, each shard's sha256 checked), else read lazily from the shards."""
    return _shard_stream(store, cfg, PAIRS_MANIFEST, "pairs", batch_size, seed)


def real_stream(store: ArtifactStore, cfg: PipelineConfig, batch_size: int, seed: int) -> Stream:
    """`pair_stream` over the `real` stage's shards: y and cond (class or prompt), no z."""
    return _shard_stream(store, cfg, REAL_MANIFEST, "real", batch_size, seed)


def _shard_stream(store: ArtifactStore, cfg: PipelineConfig, manifest: str, stage: str, batch_size: int,
                  seed: int) -> Stream:
    records = read_manifest(store, manifest)
    if not records:
        raise FileNotFoundError(f"{store.url(manifest)} is missing or empty: run the {stage} stage first")
    if sum(r.n_bytes for r in records) > cfg.distill.pairs_in_memory_mb * 2**20:
        return ShardStream(store, records, batch_size, seed=seed)
    samples = sorted((s for r in records for s in read_shard(store, r)), key=lambda s: s["index"])
    tensors = {}
    if "noise.npy" in samples[0]:
        tensors["z"] = torch.from_numpy(np.stack([s["noise.npy"] for s in samples])).float()
    tensors["y"] = torch.from_numpy(np.stack([s["image.npy"] for s in samples])).float()
    meta = samples[0].get("json") or {}
    if meta.get("guidance") is not None:  # pairs made at several CFG scales record theirs
        tensors["guidance"] = torch.tensor([s["json"]["guidance"] for s in samples], dtype=torch.float32)
    if meta.get("class") is not None:
        tensors["cond"] = torch.tensor([s["json"]["class"] for s in samples], dtype=torch.long)
    elif meta.get("prompt") is not None:
        tensors["cond"] = [s["json"]["prompt"] for s in samples]
    return TensorStream(tensors, batch_size, seed)


def sample_noise(seed: int, index: int, shape: tuple) -> torch.Tensor:
    """Noise for sample `index`: a pure function of (seed, index), so any shard regenerates identically."""
    g = torch.Generator().manual_seed(hash_seed(seed, index))
    return torch.randn(shape, generator=g)
