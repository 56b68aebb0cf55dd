"""Stage `distill`: the dmd_core trainer fed by the pair shards and fresh noise; checkpoints resume automatically."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from prefect import task
from prefect.cache_policies import NONE
from tqdm import tqdm

from dmd_core.checkpoint import bytes_to_tensors
from dmd_core.config import stable_hash
from dmd_core.digits import load_digits
from dmd_core.perceptual import build_lpips
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer
from storage import ArtifactStore
from storage.images import grid_png
from storage.layout import METRICS, checkpoint_prefix, checkpoint_steps, sample_grid_key
from tasks.context import (device_for, is_done, load_pairs, load_teacher, mark_done, null_class, open_run,
                           unmark_done)


# Changing only these lets a run continue from its checkpoints (e.g. raise distill.steps to train longer).
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "sample_every", "log_every"}
METRIC_COLUMNS = ["loss_G", "loss_dm", "loss_reg", "loss_gan_G", "loss_fake", "loss_gan_D",
                  "grad_norm_G", "grad_norm_fake", "nonfinite_skipped"]


def distill_key(cfg) -> str:
    """Hash marking the finished stage: every input of the stage."""
    return cfg.section_hash("data", "teacher", "pairs", "distill")


def resume_key(cfg) -> str:
    """Hash stored with each checkpoint: the inputs that must match to resume from it."""
    return stable_hash({"upstream": cfg.section_hash("data", "teacher", "pairs"),
                        "distill": cfg.distill.model_dump(mode="json", exclude=RESUMABLE_CHANGES)})


def checkpoint_weights(store: ArtifactStore, cfg, step: int) -> dict[str, torch.Tensor]:
    """The generator weights a checkpoint exports: EMA (default) or raw, keyed like UNetDenoiser ("unet.*")."""
    name = "ema.safetensors" if cfg.export.use_ema else "generator.safetensors"
    return bytes_to_tensors(store.read_bytes(f"{checkpoint_prefix(step)}/{name}"))


def build_trainer(store: ArtifactStore, cfg, device: torch.device) -> DMDTrainer:
    """The trainer for a run: teacher from the store, regression pairs from the shards."""
    D, _, _ = load_teacher(store, cfg, device)
    d = cfg.distill
    pairs = real = None
    if d.regression != "none":
        pairs = TensorStream(load_pairs(store), d.reg_batch_size or d.batch_size, d.seed)
    if d.gan.enabled:
        real = TensorStream(real_images(store, cfg), d.batch_size, d.seed + 1)
    lpips_model = None
    if d.regression == "lpips":
        lpips_model = build_lpips(d.lpips_net, d.lpips_weights, d.lpips_random_trunk).to(device)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return DMDTrainer(d, D, D.schedule, shape, num_classes=cfg.data.num_classes, null_cond=null_class(cfg),
                      pairs=pairs, real=real, lpips_model=lpips_model, device=device)


def config_checkpoints(store: ArtifactStore, cfg) -> list[int]:
    """Steps of the complete checkpoints written with this config (resume key), ascending."""
    key = resume_key(cfg)
    return [s for s in checkpoint_steps(store)
            if store.read_json(f"{checkpoint_prefix(s)}/_complete.json").get("hash") == key]


def real_images(store: ArtifactStore, cfg) -> dict[str, torch.Tensor]:
    """Real images for the DMD2 GAN head: the dataset itself for digits, else the teacher's pair outputs."""
    if cfg.data.name == "digits":
        images, labels = load_digits()
        return {"y": images, "cond": labels} if cfg.data.num_classes else {"y": images}
    pairs = load_pairs(store)
    return {k: v for k, v in pairs.items() if k != "z"}


def save_checkpoint(store: ArtifactStore, trainer: DMDTrainer, key: str) -> str:
    """All trainer state files, then the `_complete.json` marker last (a partial checkpoint is ignored)."""
    prefix = checkpoint_prefix(trainer.step)
    for name, data in trainer.state_files().items():
        store.write_bytes(f"{prefix}/{name}", data)
    store.write_json(f"{prefix}/_complete.json", {"step": trainer.step, "hash": key})
    return prefix


def resume(store: ArtifactStore, trainer: DMDTrainer, trainer_cfg) -> int:
    """Load the latest complete checkpoint written with this config; returns its step (0 if none)."""
    for step in reversed(config_checkpoints(store, trainer_cfg)):
        prefix = checkpoint_prefix(step)
        names = [k.rsplit("/", 1)[1] for k in store.ls(prefix)]
        trainer.load_state_files({n: store.read_bytes(f"{prefix}/{n}") for n in names if n != "_complete.json"})
        return step
    return 0


@torch.no_grad()
def sample_grid(trainer: DMDTrainer, n: int = 64) -> bytes:
    """EMA generator samples on fixed noise (class i % num_classes), as a PNG grid."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn((n, *trainer.sample_shape), generator=g).to(trainer.device)
    cond = torch.arange(n, device=trainer.device) % trainer.num_classes if trainer.num_classes else None
    renoise = torch.Generator(trainer.device).manual_seed(1)
    return grid_png(trainer.ema_generator()(z, cond, generator=renoise).float())


def run_distill(root: str, run_name: str, force: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Train to distill.steps, checkpointing every K steps; resumes from the latest checkpoint."""
    store, cfg = open_run(root, run_name)
    key, d = resume_key(cfg), cfg.distill
    if not force and is_done(store, "distill", distill_key(cfg)):
        return d.steps
    unmark_done(store, "distill")
    trainer = build_trainer(store, cfg, device_for(cfg))
    start = 0 if force else resume(store, trainer, cfg)
    if start > d.steps:
        raise ValueError(f"distill.steps={d.steps} is below the latest checkpoint (step {start}); use --force")
    rows = []
    if start and store.exists(METRICS):
        rows = [r for r in store.read_table(METRICS).to_pylist() if r["step"] < start]
    t0 = time.time()
    for _ in tqdm(range(start, d.steps), desc="distill", initial=start, total=d.steps):
        m = trainer.train_step()
        if m["step"] % d.log_every == 0 or trainer.step == d.steps:
            rows.append({**{k: float(m.get(k, float("nan"))) for k in METRIC_COLUMNS}, "step": m["step"],
                         "seconds": time.time() - t0})
        if trainer.step % d.checkpoint_every == 0 or trainer.step == d.steps:
            save_checkpoint(store, trainer, key)
            store.write_table(METRICS, {c: [r[c] for r in rows] for c in ["step", "seconds", *METRIC_COLUMNS]})
        if trainer.step % d.sample_every == 0 or trainer.step == d.steps:
            store.write_bytes(sample_grid_key(trainer.step), sample_grid(trainer))
        if progress is not None:
            progress(trainer.step, d.steps)
    mark_done(store, "distill", distill_key(cfg), steps=d.steps, nonfinite_skipped=trainer.nonfinite_skipped)
    return d.steps


@task(name="distill", cache_policy=NONE, persist_result=False)
def distill_task(root: str, run_name: str, force: bool = False) -> int:
    """Prefect wrapper of run_distill with a progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, description="distillation steps")
    return run_distill(root, run_name, force,
                       progress=lambda s, n: update_progress_artifact(artifact, 100.0 * s / n) if s % 10 == 0 else None)
