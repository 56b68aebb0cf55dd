"""Stage `distill`: the dmd_core trainer fed by the pair shard stream and fresh noise; resumes automatically."""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

import torch
from prefect import task
from prefect.cache_policies import NONE
from tqdm import tqdm

from dmd_core import accel
from dmd_core.config import stable_hash
from dmd_core.datasets import real_dataset
from dmd_core.distributed import DDPTrainer, FSDPTrainer, init_process_group
from dmd_core.guidance import student_at
from dmd_core.perceptual import build_lpips
from dmd_core.streams import TensorStream
from dmd_core.trainer import DMDTrainer, NonFiniteError
from storage import ArtifactStore, ChecksumError
from storage.checkpoints import checkpoint_folder, checkpoint_keys, list_checkpoints, read_checkpoint, write_checkpoint
from storage.layout import METRICS, checkpoint_prefix, compile_cache_key, sample_grid_key
from storage.plots import labelled_grid_png
from tasks.context import conditions, device_for, open_run, pair_stream, prompts, real_stream, run_teacher
from tasks.launch import launch_distill, wants_launch, writer_store
from tasks.gpu_slots import gpu_slots
from tasks.stages import (DISTILL_STAGE, artifact_key, config_resume_hash, resumable_checkpoints, resume_key,
                          resume_keys, uses_real_stage)

METRIC_COLUMNS = ["loss_G", "loss_dm", "loss_reg", "loss_gan_G", "loss_fake", "loss_gan_D",
                  "grad_norm_G", "grad_norm_fake", "nonfinite_skipped"]
R1_COLUMN = "loss_r1"  # only in runs with distill.gan.r1_weight > 0


def build_trainer(store: ArtifactStore, cfg, device: torch.device) -> DMDTrainer:
    """The trainer for a run's teacher (kept as `trainer.run_teacher`), regression pairs streamed from the shards."""
    d = cfg.distill
    # A LoRA trainer adapts the teacher's network in place (one base for every role), FSDP2 shards it: a copy of its own.
    sharded = d.world_size > 1 and d.parallel == "fsdp2"
    teacher = run_teacher(store, cfg, device, own=bool(d.lora_rank) or sharded)
    pairs = real = None
    if d.regression != "none":
        pairs = pair_stream(store, cfg, d.reg_batch_size or d.batch_size, d.seed)
    if d.gan_used:  # DMD2's GAN sees real images: data.real, the named dataset, else the teacher's pair outputs
        dataset = real_dataset(cfg.data.name)
        if uses_real_stage(cfg):
            real = real_stream(store, cfg, d.batch_size, d.seed + 1)
        elif dataset is not None:
            images, labels = dataset
            real = TensorStream({"y": images, "cond": labels} if teacher.num_classes else {"y": images},
                                d.batch_size, d.seed + 1)
        else:
            real = pair_stream(store, cfg, d.batch_size, d.seed + 1)
    lpips_model = None
    if d.regression == "lpips":
        lpips_model = build_lpips(d.lpips_net, d.lpips_weights, d.lpips_random_trunk).to(device)
    # Streams carry the global batch; the parallel trainer splits it over the ranks.
    trainer_cls = DMDTrainer if d.world_size == 1 else FSDPTrainer if sharded else DDPTrainer
    trainer = trainer_cls(d, teacher, conditions=conditions(teacher, cfg), pairs=pairs, real=real,
                          lpips_model=lpips_model, device=device, pairs_guidance=cfg.pairs.guidance)
    trainer.run_teacher = teacher
    return trainer


def resume(store: ArtifactStore, trainer: DMDTrainer, cfg) -> int:
    """Load the latest valid checkpoint written with this config and these pairs; returns its step (0 if none).
    With distill.phases each checkpoint is matched under the key of its own step (`resume_key`): a changed phase
    leaves those made before it began usable. When there is none but the same config trained on another pair set
    (regenerated pairs), say so in one line and start afresh, or with distill.on_new_pairs=continue take that
    set's latest weights (streams restarted)."""
    key_at = resume_keys(store, cfg)
    found = resumable_checkpoints(store, cfg)
    if found or not (old := checkpoints_of_other_pairs(store, cfg)):
        return load_latest(store, trainer, found)
    old_key, old_steps = old
    old_checkpoints = [(s, old_key) for s in old_steps]
    last = old_steps[-1]
    if old_key == config_resume_hash(cfg, last) and trained_on_these_pairs(store, old_key, last, key_at(last)):
        # written before the resume key named the pair set, on these very pairs: resume, under the new key
        start = load_latest(store, trainer, old_checkpoints)
        if start:
            write_checkpoint(store, start, trainer.state_files(), key_at(start))
        return start
    where = store.url(checkpoint_prefix(last, checkpoint_folder(store, old_key)))
    if cfg.distill.on_new_pairs == "restart":
        print(f"distill: the pairs changed since the checkpoints up to step {last} ({where}); starting "
              "from step 0, those stay in place (distill.on_new_pairs=continue resumes from their weights)")
        return 0
    start = load_latest(store, trainer, old_checkpoints, fresh_streams=True)
    if start:  # the weights carried over, as this pair set's first checkpoint
        write_checkpoint(store, start, trainer.state_files(), key_at(start))
        print(f"distill: the pairs changed since the checkpoints up to step {last} ({where}); continuing "
              f"from step {start}'s weights with the pair stream from its start (distill.on_new_pairs=continue)")
    return start


def trained_on_these_pairs(store: ArtifactStore, old_key: str, step: int, key: str) -> bool:
    """Whether checkpoint `step` of `old_key` streamed the pair set `key` names, by the manifest fingerprint its
    shard stream recorded; a stream that recorded none (pairs held in memory, or none read) resumes as it did
    before pair sets had keys."""
    try:
        state = json.loads(read_checkpoint(store, step, old_key)["trainer_state.json"])
    except (ChecksumError, KeyError, ValueError):
        return False
    pairs = state.get("pairs")
    recorded = pairs.get("manifest") if isinstance(pairs, dict) else None
    return recorded is None or key.split("-")[1] == recorded[:16]


def checkpoints_of_other_pairs(store: ArtifactStore, cfg) -> Optional[tuple[str, list[int]]]:
    """(key, steps) of the checkpoints of this config made on another pair set, the latest step's; None if none."""
    key_at = resume_keys(store, cfg)
    others = [(k, s) for k, s in checkpoint_keys(store).items()
              if k != key_at(s[-1]) and k.split("-")[0] == config_resume_hash(cfg, s[-1])]
    return max(others, key=lambda ks: ks[1][-1], default=None)


def load_latest(store: ArtifactStore, trainer: DMDTrainer, checkpoints: list[tuple[int, str]],
                fresh_streams: bool = False) -> int:
    """Load the latest of `checkpoints` ((step, key), ascending); a damaged one (a file whose sha256 differs from
    its marker's) is named and skipped for the one before it. Returns the step loaded, 0 if none."""
    for i in reversed(range(len(checkpoints))):
        step, key = checkpoints[i]
        try:
            files = read_checkpoint(store, step, key)
        except ChecksumError as err:
            previous = f"step {checkpoints[i - 1][0]}" if i else "the start"
            print(f"checkpoint step {step} is damaged ({err}); falling back to {previous}")
            continue
        if fresh_streams:
            state = json.loads(files["trainer_state.json"])
            files["trainer_state.json"] = json.dumps({**state, "pairs": None, "real": None}).encode()
        trainer.load_state_files(files)
        return step
    return 0


def grid_conditions(cfg, teacher, rows: int = 8):
    """One fixed raw condition per grid row: classes 0, 1, 2, ... or the first prompts of the caption source."""
    if teacher.conditioning == "text":
        texts = prompts(cfg)
        return [texts[i % len(texts)] for i in range(rows)]
    return torch.arange(min(teacher.num_classes, 10)) if teacher.num_classes else None


@torch.no_grad()
def sample_grid(trainer: DMDTrainer, row_cond, rows: int = 8, cols: int = 8) -> bytes:
    """EMA generator samples on fixed noise, decoded: one row per condition (labelled class or prompt)."""
    rows = len(row_cond) if row_cond is not None else rows
    g = torch.Generator().manual_seed(0)
    z = torch.randn((rows * cols, *trainer.sample_shape), generator=g).to(trainer.device)
    raw = None
    if row_cond is not None:  # sample i is in row i // cols
        raw = ([c for c in row_cond for _ in range(cols)] if isinstance(row_cond, list)
               else row_cond.repeat_interleave(cols))
    renoise = torch.Generator(trainer.device).manual_seed(1)
    G = student_at(trainer.ema_generator(), trainer.cfg)
    x = trainer.decode(G(z, trainer.encode(raw) if raw is not None else None, generator=renoise))
    x = x.float().cpu()
    labels = None if row_cond is None else [str(c) if isinstance(c, str) else f"class {int(c)}" for c in row_cond]
    return labelled_grid_png([(f"z{j}", x[j::cols]) for j in range(cols)], labels)


def train_step_or_stop(store: ArtifactStore, trainer: DMDTrainer, cfg) -> dict:
    """One step; after distill.max_consecutive_nonfinite non-finite steps in a row, stop naming the last checkpoint."""
    try:
        return trainer.train_step()
    except NonFiniteError as err:
        found, last = resumable_checkpoints(store, cfg), "none yet"
        if found:
            step, key = found[-1]
            last = f"step {step} ({store.url(checkpoint_prefix(step, checkpoint_folder(store, key)))})"
        raise NonFiniteError(f"distill stopped: {err} (distill.max_consecutive_nonfinite="
                             f"{cfg.distill.max_consecutive_nonfinite}); last good checkpoint: {last}") from None


class CompileCache:
    """torch's compile cache artifacts kept with the run: loaded before the first compiled call; written at the
    first checkpoint after compiling and at the last step, when they grew. Keyed by torch version, GPU name, the
    config part of the checkpoint key and the compile mode: only a process compiling the same graphs reads them."""

    def __init__(self, store: ArtifactStore, cfg, trainer: DMDTrainer, writer: bool) -> None:
        mode = trainer.auto_compile_mode or trainer.compile_mode
        self.enabled = trainer.device.type == "cuda" and mode != "none"
        gpu = torch.cuda.get_device_name(trainer.device) if self.enabled else ""
        self.key = compile_cache_key(stable_hash({"torch": torch.__version__, "gpu": gpu, "mode": mode,
                                                  "config": config_resume_hash(cfg),
                                                  "scope": cfg.distill.compile_scope}))
        self.store, self.writer, self.saved_bytes, self.loaded, self.written = store, writer, 0, False, False
        if self.enabled and store.exists(self.key):
            blob = store.read_bytes(self.key)
            accel.load_compile_cache(blob)
            self.saved_bytes, self.loaded = len(blob), True
            print(f"compile cache loaded: {store.url(self.key)} ({len(blob) / 2**20:.1f} MiB)")

    def save(self, trainer: DMDTrainer, last: bool) -> None:
        """At the first checkpoint after compiling, and at the last step: write the artifacts if they grew."""
        if not (self.enabled and self.writer) or trainer.compile_mode == "none" or (self.written and not last):
            return
        blob, self.written = accel.compile_cache_bytes(), True
        if blob and len(blob) > self.saved_bytes:
            self.store.write_bytes(self.key, blob)
            self.saved_bytes = len(blob)


def run_distill(root: str, run_name: str, force: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> int:
    """Train to distill.steps, checkpointing every K steps; resumes from the latest checkpoint."""
    store, cfg = open_run(root, run_name)
    key, d = resume_key(store, cfg), cfg.distill
    key_at = resume_keys(store, cfg)  # with distill.phases, each checkpoint's key names the phases begun before it
    if not force and DISTILL_STAGE.is_done(store, cfg) and d.steps in list_checkpoints(store, key):
        return d.steps
    if wants_launch(d):  # torchrun starts distill.world_size ranks, each running this function
        launch_distill(root, run_name, force, d)
        if not DISTILL_STAGE.is_done(store, cfg):
            raise RuntimeError(f"distill: the torchrun ranks exited without marking {store.url(DISTILL_STAGE.marker)}")
        if progress is not None:
            progress(d.steps, d.steps)
        return d.steps
    device, rank = device_for(cfg), 0
    if d.world_size > 1:
        rank = init_process_group(device.type).rank
        device = torch.device(device.type, torch.cuda.current_device()) if device.type == "cuda" else device
        store = writer_store(store)  # rank 0 writes checkpoints, metrics and samples
    DISTILL_STAGE.unmark(store)
    trainer = build_trainer(store, cfg, device)
    teacher = trainer.run_teacher
    start = 0 if force else resume(store, trainer, cfg)
    if start > d.steps:
        raise ValueError(f"distill.steps={d.steps} is below the latest checkpoint (step {start}); use --force")
    rows = []
    if start and store.exists(METRICS):
        rows = [r for r in store.read_table(METRICS).to_pylist() if r["step"] < start]
    grid_cond, grid_cols = grid_conditions(cfg, teacher), 2 if teacher.codec is not None else 8
    cache = CompileCache(store, cfg, trainer, writer=rank == 0)
    auto = accel.CompileWhenItPays(d.steps - start, cache.loaded) if trainer.auto_compile_mode else None
    columns = METRIC_COLUMNS + [R1_COLUMN] * any(d.phase_config(k).gan.r1_weight > 0
                                                 for k in range(len(d.phases or [d])))
    t0 = time.time()
    writer, shards = rank == 0, d.world_size > 1 and d.parallel == "fsdp2"
    for _ in tqdm(range(start, d.steps), desc="distill", initial=start, total=d.steps, disable=not writer):
        t_step = time.perf_counter()
        m = train_step_or_stop(store, trainer, cfg)
        if auto is not None:  # ranks agree on rank 0's decision
            if trainer.agree(auto.observe(time.perf_counter() - t_step)):
                trainer.compile(trainer.auto_compile_mode)
            if auto.decided is not None:
                if writer:
                    print(auto.explain())
                auto = None
        if m["step"] % d.log_every == 0 or trainer.step == d.steps:
            rows.append({**{k: float(m.get(k, float("nan"))) for k in columns}, "step": m["step"],
                         "seconds": time.time() - t0})
        if trainer.step % d.checkpoint_every == 0 or trainer.step == d.steps:
            # metrics first: a kill between the two leaves rows that a resume from the previous checkpoint drops
            store.write_table(METRICS, {c: [r.get(c, float("nan")) for r in rows] for c in ["step", "seconds", *columns]})
            # every rank: RNG states are gathered
            write_checkpoint(store, trainer.step, trainer.state_files(), key_at(trainer.step))
            cache.save(trainer, last=trainer.step == d.steps)
        if (writer or shards) and (trainer.step % d.sample_every == 0 or trainer.step == d.steps):
            grid = sample_grid(trainer, grid_cond, cols=grid_cols)  # a sharded EMA runs on every rank
            if writer:
                store.write_bytes(sample_grid_key(trainer.step), grid)
        if progress is not None:
            progress(trainer.step, d.steps)
    DISTILL_STAGE.mark(store, cfg, steps=d.steps, nonfinite_skipped=trainer.nonfinite_skipped)
    return d.steps


@task(name="distill", cache_policy=NONE, persist_result=False)
def distill_task(root: str, run_name: str, force: bool = False) -> int:
    """Prefect wrapper of run_distill with a progress artifact."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key=artifact_key(run_name, "distill"), description="distillation steps")
    cfg = open_run(root, run_name)[1]
    d = cfg.distill
    ranks_here = d.world_size // d.nnodes if wants_launch(d) else 1  # torchrun starts them: one slot (GPU) each
    with gpu_slots(cfg, occupy=ranks_here):
        return run_distill(root, run_name, force, progress=lambda s, n: update_progress_artifact(
            artifact, 100.0 * s / n) if s % 10 == 0 or s == n else None)
