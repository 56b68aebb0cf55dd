"""The files a teacher folder must hold, checked without loading anything (no torch, no diffusers): what the
command line checks before a server starts."""
from __future__ import annotations

import json
from pathlib import Path


class TeacherLoadError(FileNotFoundError):
    """A teacher folder lacks a file or does not load; the message names the file."""


def require(path: Path) -> Path:
    if not path.exists():
        raise TeacherLoadError(f"teacher folder: {path} not found")
    return path


def require_weights(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise TeacherLoadError(f"teacher folder: no *.safetensors weights in {folder} (pickled .bin weights are "
                               "not loaded; convert them with save_pretrained(safe_serialization=True))")


def subfolder(root: Path, name: str) -> Path:
    return root / name if (root / name).is_dir() else root


def check_unet2d(root: Path) -> tuple[Path, Path]:
    unet_dir, sched_dir = subfolder(root, "unet"), subfolder(root, "scheduler")
    require(unet_dir / "config.json")
    require_weights(unet_dir)
    require(sched_dir / "scheduler_config.json")
    return unet_dir, sched_dir


def check_teacher_folder(kind: str, path: str | Path) -> None:
    """The files the family of `kind` loads are there (cheap: nothing is loaded); TeacherLoadError names one."""
    from .families import family

    if not (path and Path(path).is_dir()):
        raise TeacherLoadError(f"teacher folder {path} not found")
    family(kind).check_folder(Path(path))


def read_scheduler(folder: Path) -> dict:
    path = require(folder / "scheduler_config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TeacherLoadError(f"teacher folder: {path} is not valid JSON ({err.msg})") from None
