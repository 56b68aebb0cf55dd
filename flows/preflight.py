"""Checks made before a server starts or a byte is written: the root, the run, the device, the teacher folder
and the stages asked for. Each failure is one line naming the field or file (`PreflightError`)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from dmd_core.config import resolve_path

from tasks.config import PipelineConfig
from dmd_core.families import family
from dmd_core.teacher_files import TeacherLoadError, check_teacher_folder
from storage.layout import CONFIG, list_runs, run_store

SCHEMES = ("file", "memory", "s3", "gs", "gcs")


class PreflightError(ValueError):
    """Bad input found before anything ran."""


def check_root(root: str, env_credentials: bool = True) -> None:
    """Known scheme; a local root is (or can be made) a writable folder; object stores have credentials (in the
    environment, unless `env_credentials` is False: they come from a Prefect block)."""
    if not root or not root.strip():
        raise PreflightError("--root: empty; give a folder or a URL (file://, memory://, s3://, gs://)")
    scheme = root.split("://", 1)[0] if "://" in root else "file"
    if scheme not in SCHEMES:
        raise PreflightError(f"--root {root}: unknown scheme {scheme!r}; use a path or one of "
                             + ", ".join(f"{s}://" for s in SCHEMES))
    if scheme == "file":
        _check_local_root(Path(root.removeprefix("file://")).expanduser().absolute())
    elif scheme == "s3" and env_credentials:
        _check_s3_credentials(root)


def _check_local_root(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise PreflightError(f"--root {path}: is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"--root {path}: {existing} is a file, not a folder")
    try:  # a probe that leaves nothing behind: as root, os.access says yes even on read-only mounts
        tempfile.TemporaryDirectory(dir=existing, prefix=".dmd-probe-").cleanup()
    except OSError as err:
        raise PreflightError(f"--root {path}: cannot write under {existing} ({err.strerror or err})") from None


def _check_s3_credentials(root: str) -> None:
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise PreflightError(f"--root {root}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")


def check_device(cfg: PipelineConfig) -> None:
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise PreflightError("device: 'cuda' but no CUDA device is available; set device=cpu or auto")


def check_distributed(cfg: PipelineConfig, root: str) -> None:
    """Ranks started by torchrun are other processes: they need a root they can open and GPUs enough."""
    d = cfg.distill
    if cfg.pairs.runner != "threads" and root.startswith("memory://"):
        raise PreflightError(f"--root {root}: pairs.runner={cfg.pairs.runner} runs shard tasks in other processes, "
                             "which cannot see this process's memory:// store; use a folder or s3://")
    if d.world_size == 1 and d.launcher != "torchrun":
        return
    if root.startswith("memory://"):
        raise PreflightError(f"--root {root}: distill.world_size={d.world_size} starts other processes, which "
                             "cannot see this process's memory:// store; use a folder or s3://")
    if cfg.device != "cpu" and d.nnodes == 1 and d.launcher != "none":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and gpus < d.world_size:
            raise PreflightError(f"distill.world_size: {d.world_size} ranks on one node but {gpus} GPU(s) visible; "
                                 "lower it, or set distill.nnodes and distill.rdzv_endpoint")


def check_teacher(cfg: PipelineConfig) -> None:
    t = cfg.teacher
    if t.source == "path" and t.kind != "callable":
        try:
            check_teacher_folder(t.kind, resolve_path(t.path))
        except TeacherLoadError as err:
            raise PreflightError(f"teacher.path: {err}") from None
        if not family(t.kind).latent:  # a pixel teacher's images are the data's
            check_teacher_shape(cfg, Path(resolve_path(t.path)))
    if cfg.data.captions and "://" not in cfg.data.captions and not Path(resolve_path(cfg.data.captions)).is_file():
        raise PreflightError(f"data.captions: {cfg.data.captions} not found")


def check_teacher_shape(cfg: PipelineConfig, folder: Path) -> None:
    """A pixel teacher's sample size and channels are the data's (read from its unet config, nothing loaded)."""
    path = folder / "unet" / "config.json" if (folder / "unet").is_dir() else folder / "config.json"
    try:
        unet = json.loads(path.read_text())
    except ValueError as err:
        raise PreflightError(f"teacher.path: {path} is not valid JSON ({err})") from None
    size = unet.get("sample_size")
    sizes = {size} if isinstance(size, int) else set(size or [])
    if sizes and sizes != {cfg.data.image_size}:
        raise PreflightError(f"data.image_size={cfg.data.image_size} does not match the teacher's sample_size "
                             f"{size} ({path}); set data.image_size={size}")
    channels = unet.get("in_channels")
    if channels is not None and channels != cfg.data.channels:
        raise PreflightError(f"data.channels={cfg.data.channels} does not match the teacher's in_channels "
                             f"{channels} ({path}); set data.channels={channels}")


def check_resume(cfg: PipelineConfig, root: str, run_name: str, stages: Optional[list[str]], force: bool) -> None:
    """Training to fewer steps than the run's latest checkpoint is refused before anything is rewritten."""
    from tasks.stages import resumable_checkpoints

    if force or (stages and "distill" not in stages):
        return
    store = run_store(root, run_name)
    if not store.exists(CONFIG):
        return
    steps = [step for step, _ in resumable_checkpoints(store, cfg)]
    if steps and steps[-1] > cfg.distill.steps:
        raise PreflightError(f"distill.steps={cfg.distill.steps} is below the run's latest checkpoint (step "
                             f"{steps[-1]}); raise distill.steps or pass --force to retrain from the start")


def check_run(root: str, run_name: str, stages: Optional[list[str]]) -> None:
    """A rerun of later stages needs the run to exist (its saved config)."""
    store = run_store(root, run_name)
    if stages and "teacher" not in stages and not store.exists(CONFIG):
        runs = list_runs(root)
        raise PreflightError(f"run {run_name!r} does not exist under {root} (no {CONFIG}); runs there: "
                             + (", ".join(runs) if runs else "none") + "; run the teacher stage first or pick one")


def preflight(cfg: PipelineConfig, root: str, run_name: Optional[str], stages: Optional[list[str]],
              force: bool = False) -> None:
    """Every check, cheapest first; raises PreflightError with one line."""
    check_root(root, env_credentials=cfg.storage.credentials_block is None)
    try:
        run_store(root, run_name or cfg.name)
    except ValueError as err:
        raise PreflightError(f"--run-name: {err}") from None
    check_device(cfg)
    check_distributed(cfg, root)
    check_teacher(cfg)
    check_run(root, run_name or cfg.name, stages)
    check_resume(cfg, root, run_name or cfg.name, stages, force)
